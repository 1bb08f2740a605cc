"""Inputs: manifests (`manifest`), media decoding (`media`, `video`) and data-set importers (`mmsa`)."""
