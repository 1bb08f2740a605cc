"""WavLM's attention through SDPA (featx.encoders.wavlm_sdpa, extract --audio-attention): the same hidden states
as transformers' eager WavLM forward, with and without an attention mask, for both WavLM layouts."""
import numpy as np
import pandas as pd
import pytest
import torch

from featx import extract
from featx.cache import open_cache
from featx.errors import FeatxError
from featx.settings import ExtractSettings

from conftest import write_wav

TOL = 1e-4   # fp32 on the CPU, every layer, every position


def _strong_position_bias(path, seed):
    """Re-save the tiny checkpoint at `path` with a gated position bias far larger than its random init gives
    (std 0.02), so that a wrong bias or gate shows in the hidden states."""
    from transformers import WavLMModel

    model = WavLMModel.from_pretrained(path).eval()
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for module in model.modules():
            if hasattr(module, "gru_rel_pos_const"):
                module.gru_rel_pos_const.copy_(0.5 + 1.5 * torch.rand(module.gru_rel_pos_const.shape, generator=g))
                module.gru_rel_pos_linear.weight.mul_(4.0)
            if hasattr(module, "rel_attn_embed"):
                module.rel_attn_embed.weight.normal_(0.0, 2.0, generator=g)
    model.save_pretrained(path)
    return path


@pytest.fixture(scope="module")
def wavlms(tmp_path_factory):
    """{"group": WavLM-Base's layout (group-norm conv features, no mask), "layer": WavLM-Large's (mask)}."""
    from featx.demo.tiny import build_tiny_wavlm

    root = tmp_path_factory.mktemp("wavlm-sdpa")
    return {norm: _strong_position_bias(build_tiny_wavlm(str(root / norm), norm=norm, seed=k), seed=k)
            for k, norm in enumerate(("group", "layer"))}


@pytest.fixture(scope="module")
def clips(tmp_path_factory):
    """A manifest of 5 wav files of 0.3 to 1.1 s, and one that is not audio (a failed item)."""
    d = tmp_path_factory.mktemp("wavlm-sdpa-data")
    rows = []
    for k in range(5):
        write_wav(d / f"a{k}.wav", 0.3 + 0.2 * k, seed=k, freq=150.0 + 40 * k)
        rows.append({"id": f"a{k}", "audio": f"a{k}.wav", "label": float(k % 2)})
    path = d / "clips.csv"
    pd.DataFrame(rows).to_csv(path, index=False)
    (d / "broken.wav").write_bytes(b"not a wav file")
    broken = d / "broken.csv"
    pd.DataFrame(rows + [{"id": "broken", "audio": "broken.wav", "label": 0.0}]).to_csv(broken, index=False)
    return {"clips": str(path), "broken": str(broken)}


def _hidden_states(model, x, mask):
    with torch.no_grad():
        return model(x, attention_mask=mask, output_hidden_states=True).hidden_states


def _max_diff(a, b):
    return max(float((x - y).abs().max()) for x, y in zip(a, b))


@pytest.mark.parametrize("norm", ["group", "layer"])
def test_sdpa_forward_equals_eager_with_and_without_mask(wavlms, norm):
    from transformers import WavLMModel

    from featx.encoders.wavlm_sdpa import sdpa_attention_forward, use_sdpa_attention

    model = WavLMModel.from_pretrained(wavlms[norm]).eval()
    g = torch.Generator().manual_seed(1)
    x = torch.randn(3, 12000, generator=g)
    mask = torch.ones(3, 12000, dtype=torch.long)
    mask[1, 7000:] = 0
    mask[2, 2500:] = 0   # a padded batch: 3 items of 0.75, 0.44 and 0.16 s
    eager = [_hidden_states(model, x, m) for m in (None, mask)]
    assert use_sdpa_attention(model) == model.config.num_hidden_layers
    fused = [_hidden_states(model, x, m) for m in (None, mask)]
    for ref, got in zip(eager, fused):
        assert len(got) == model.config.num_hidden_layers + 1
        assert _max_diff(ref, got) <= TOL
    # The check has teeth: the position bias changes the output far beyond the tolerance.
    attention = model.encoder.layers[0].attention
    h = torch.randn(2, 9, model.config.hidden_size, generator=g)
    bias = attention.compute_bias(9, 9).unsqueeze(0)
    with torch.no_grad():
        with_bias = sdpa_attention_forward(attention, h)[0]
        without = sdpa_attention_forward(attention, h, position_bias=torch.zeros_like(bias))[0]
    assert float((with_bias - without).abs().max()) > 100 * TOL


def _eager_gate(attention, h):
    """WavLMAttention.forward's gate, step by step as transformers writes it: (B, H, T, 1)."""
    x = h.view(h.shape[:-1] + (attention.num_heads, -1)).permute(0, 2, 1, 3)
    proj = attention.gru_rel_pos_linear(x).view(x.shape[:-1] + (2, 4)).sum(-1)
    gate_a, gate_b = torch.sigmoid(proj).chunk(2, dim=-1)
    return gate_a * (gate_b * attention.gru_rel_pos_const - 1.0) + 2.0


def test_attention_bias_is_the_masked_gated_bias_rounded_once(wavlms):
    """The one-pass bias (key padding folded into an addcmul written in the compute dtype) is exactly the former
    construction: the fp32 gated bias, -inf at padded keys, then cast to the compute dtype."""
    from transformers import WavLMModel

    from featx.encoders.wavlm_sdpa import attention_bias

    model = WavLMModel.from_pretrained(wavlms["layer"]).eval()
    first, second = model.encoder.layers[0].attention, model.encoder.layers[1].attention
    g = torch.Generator().manual_seed(2)
    h = torch.randn(3, 11, model.config.hidden_size, generator=g)
    mask = torch.ones(3, 11, dtype=torch.long)
    mask[1, 7:] = 0
    mask[2, 3:] = 0
    with torch.no_grad():
        position_bias = first.compute_bias(11, 11).unsqueeze(0)
        gated = _eager_gate(second, h) * position_bias                              # (B, H, T, T) fp32
        for m in (None, mask):
            ref = gated if m is None else gated.masked_fill(m[:, None, None, :].ne(1), float("-inf"))
            for dtype in (torch.float32, torch.bfloat16, torch.float16):
                got = attention_bias(second, h, position_bias, m, dtype=dtype)
                assert got.dtype == dtype and got.shape == (3, second.num_heads, 11, 11)
                assert torch.equal(got, ref.to(dtype))
                # Strides SDPA's memory-efficient CUDA kernel takes without copying the mask into a padded one.
                assert got.stride(-1) == 1 and all(s % 8 == 0 for s in got.stride()[:-1])
    assert int(torch.isinf(ref).sum()) == second.num_heads * 11 * (4 + 8)   # the padded keys, every query row


def test_sdpa_gradients_equal_eager(wavlms):
    """With gradients (featx finetune trains through this attention) the one-pass bias, whose out= takes no
    gradient, is not used: every parameter's gradient equals the eager attention's."""
    from transformers import WavLMModel

    from featx.encoders.wavlm_sdpa import use_sdpa_attention

    eager, sdpa = (WavLMModel.from_pretrained(wavlms["layer"]).eval() for _ in range(2))
    use_sdpa_attention(sdpa)
    g = torch.Generator().manual_seed(3)
    x = torch.randn(2, 6000, generator=g)
    mask = torch.ones(2, 6000, dtype=torch.long)
    mask[1, 3500:] = 0
    weights = torch.randn(eager.config.hidden_size, generator=g)
    grads = []
    for model in (eager, sdpa):
        (model(x, attention_mask=mask).last_hidden_state @ weights).square().mean().backward()
        grads.append({name: p.grad for name, p in model.named_parameters() if p.grad is not None})
    assert grads[0].keys() == grads[1].keys()
    for name in ("encoder.layers.0.attention.rel_attn_embed.weight", "encoder.layers.1.attention.gru_rel_pos_const"):
        assert float(grads[0][name].abs().max()) > 0
    for name, ref in grads[0].items():
        assert float((grads[1][name] - ref).abs().max()) <= TOL * max(1.0, float(ref.abs().max())), name


def _bf16_error(model, x, mask, ref):
    """Max abs difference of every hidden state of `model` under CPU bf16 autocast from `ref` (fp32 eager)."""
    with torch.no_grad(), torch.autocast("cpu", dtype=torch.bfloat16):
        got = model(x, attention_mask=mask, output_hidden_states=True).hidden_states
    assert got[-1].dtype == torch.bfloat16
    return _max_diff(ref, [h.float() for h in got])


@pytest.mark.parametrize("norm", ["group", "layer"])
def test_sdpa_under_bf16_autocast_is_as_close_to_fp32_eager_as_eager_bf16(wavlms, norm):
    """Under bf16 autocast (featx's precision on CUDA; here the CPU's) SDPA is no further from transformers'
    fp32 eager attention than eager's own bf16 forward (both round the bias to bf16 once): for one attention
    module's output, and for every hidden state of the model."""
    from transformers import WavLMModel
    from transformers.models.wavlm.modeling_wavlm import WavLMAttention

    from featx.encoders.wavlm_sdpa import sdpa_attention_forward, use_sdpa_attention

    eager, sdpa = (WavLMModel.from_pretrained(wavlms[norm]).eval() for _ in range(2))
    g = torch.Generator().manual_seed(1)
    attention = eager.encoder.layers[0].attention
    h = torch.randn(3, 40, eager.config.hidden_size, generator=g)
    short = torch.ones(3, 40, dtype=torch.long)
    short[1, 25:] = 0
    short[2, 9:] = 0
    zero = torch.zeros(1, attention.num_heads, 40, 40)
    for m in (None, short):
        with torch.no_grad():
            ref = WavLMAttention.forward(attention, h, m)[0]
            with torch.autocast("cpu", dtype=torch.bfloat16):
                outs = [f(attention, h, m, **kw)[0] for f, kw in ((WavLMAttention.forward, {}),
                                                                    (sdpa_attention_forward, {}),
                                                                    (sdpa_attention_forward, {"position_bias": zero}))]
        assert all(o.dtype == torch.bfloat16 for o in outs)
        # RMS error: a max over these few values falls either way by rounding (seen: SDPA 0.7x to 1.1x eager's)
        eager_error, sdpa_error, no_bias_error = (float((o.float() - ref).pow(2).mean().sqrt()) for o in outs)
        assert 0 < sdpa_error <= eager_error
        assert no_bias_error > 10 * eager_error      # the check has teeth: the bias counts far beyond that
    use_sdpa_attention(sdpa)
    x = torch.randn(3, 12000, generator=g)
    mask = torch.ones(3, 12000, dtype=torch.long)
    mask[1, 7000:] = 0
    mask[2, 2500:] = 0
    for m in (None, mask):
        ref = _hidden_states(eager, x, m)   # max over every hidden state, as bench_wavlm.py reports it
        assert 0 < _bf16_error(sdpa, x, m, ref) <= 1.1 * _bf16_error(eager, x, m, ref)   # 10%: rounding


def _extract(manifest, model, out, **options):
    result = extract(manifest, [model], out, dtype="float32", seq=True, progress=False, **options)
    return result.paths[0]


def _direct_eager(model_dir, waves):
    """Each wave alone through transformers' eager WavLM with the checkpoint's feature extractor: (T, L, D)."""
    from transformers import AutoFeatureExtractor, WavLMModel

    fe, model = AutoFeatureExtractor.from_pretrained(model_dir), WavLMModel.from_pretrained(model_dir).eval()
    return [torch.stack(_hidden_states(model, fe(w, sampling_rate=fe.sampling_rate, return_tensors="pt")
                                       ["input_values"], None), 2)[0].numpy() for w in waves]


@pytest.mark.parametrize("norm", ["group", "layer"])
def test_extract_with_sdpa_equals_eager_transformers(wavlms, clips, tmp_path, norm):
    import soundfile as sf

    path = _extract(clips["clips"], wavlms[norm], tmp_path / "sdpa", batch_size=4)
    folder = clips["clips"].rsplit("/", 1)[0]
    with open_cache(path) as c:
        assert c.attrs["audio_attention"] == "sdpa"
        refs = _direct_eager(wavlms[norm], [sf.read(f"{folder}/{item}.wav", dtype="float32")[0] for item in c.ids])
        for i, ref in enumerate(refs):
            got = c.sequence(i)
            assert got.shape == ref.shape
            assert float(np.abs(got - ref).max()) <= TOL
    if norm == "layer":   # padded batches of 4 against one item at a time (group-norm ones batch equal lengths)
        one = _extract(clips["clips"], wavlms[norm], tmp_path / "one", batch_size=1)
        with open_cache(path) as c, open_cache(one) as c1:
            assert max(float(np.abs(c.sequence(i) - c1.sequence(i)).max()) for i in range(len(c.ids))) <= 1e-5


def test_audio_attention_is_a_cache_setting(wavlms, clips, tmp_path):
    eager = _extract(clips["broken"], wavlms["layer"], tmp_path, audio_attention="eager", batch_size=4)
    with open_cache(eager) as c:
        assert c.attrs["audio_attention"] == "eager" and int(c.done.sum()) == 5   # the broken file failed
    with pytest.raises(FeatxError, match="audio_attention 'eager' \\(now 'sdpa'\\)"):
        _extract(clips["broken"], wavlms["layer"], tmp_path, batch_size=4)   # the failed item would be retried


def test_audio_attention_option_is_checked():
    with pytest.raises(FeatxError, match="--audio-attention unknown audio attention 'flash'; choose from sdpa, eager"):
        ExtractSettings(manifest="m.csv", model=["m"], out="o", audio_attention="flash")
    assert ExtractSettings(manifest="m.csv", model=["m"], out="o").kwargs()["audio_attention"] == "sdpa"


def test_frame_mask_equals_transformers_mask_without_waiting_for_the_device(tiny_wavlm):
    # featx sets frame_mask on wav2vec2-family models in place of transformers' _get_feature_vector_attention_mask,
    # whose index assignment waits for the GPU every batch; the masks must be equal
    from transformers import AutoModel

    from featx.encoders import load_encoder
    from featx.encoders.audio import frame_mask
    plain = AutoModel.from_pretrained(tiny_wavlm)
    assert load_encoder(tiny_wavlm).model._get_feature_vector_attention_mask.__func__ is frame_mask
    rng = np.random.default_rng(0)
    samples = 16000
    frames = int(plain._get_feat_extract_output_lengths(torch.tensor(samples)))
    for lengths in ([samples, 400, 401, 7999], [samples] * 3, rng.integers(400, samples, 16).tolist()):
        mask = (torch.arange(samples)[None, :] < torch.tensor(lengths)[:, None]).long()
        want = plain._get_feature_vector_attention_mask(frames, mask)
        got = frame_mask(plain, frames, mask)
        assert got.dtype == want.dtype == torch.bool and torch.equal(got, want)
