"""The wire contract: generated modules in `opd.v1`, the array codec in `opd.tensors`, mask reasons by name in `opd.mask_reasons`."""
