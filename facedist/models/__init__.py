"""Torch modules: regressors (MobileNetV1, ResNet-50 R-Net), C-Net, 1-D and 2-D ResNet classifiers."""
