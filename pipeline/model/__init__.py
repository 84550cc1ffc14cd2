"""The model stage: specs, weights, preprocessing, precision and compilation of frozen feature extractors."""
