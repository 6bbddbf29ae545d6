"""The wire contract: generated modules in `opd.v1`, the array codec in `opd.tensors`."""
