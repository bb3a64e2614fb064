"""Evaluating a trained run: test-split accuracy / mIoU and the feature distances."""
