"""The probe stage: linear probes and k-NN on frozen features, fine-tuning, and exported classifiers."""
