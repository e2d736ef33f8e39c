"""convscale: compute-matched scaling studies of ConvNets (NFNets) and Vision Transformers."""

__version__ = "0.1.0"


def create_model(name: str, num_classes: int = 1000, **overrides):
    """Build a zoo model by name (``nfnet-f0``, ``NFNet-F7+``, ``vit-b16``, ``ViT-B/16``,
    ``nfnet-w0.25-d1.1.1``, ``vit-w64-d4-p4`` ...), overriding any config field."""
    from convscale.models import create_model as _create

    return _create(name, num_classes=num_classes, **overrides)


__all__ = ["create_model", "__version__"]
