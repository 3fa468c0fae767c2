"""Data: dataset formats and their detection, the synthetic demo set, decoding and caching images,
splits, and augmentation."""
