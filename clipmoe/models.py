"""Creating the dense base model: open_clip names (plus clipmoe's own tiny configs) or a local checkpoint."""
from pathlib import Path

CONFIG_DIR = Path(__file__).parent / "model_configs"
_registered = False


def register_model_configs():
    """Make clipmoe's model configs (e.g. "clipmoe-tiny", a 2-layer CLIP for tests and CPU demos) known to
    open_clip.create_model."""
    global _registered
    if not _registered:
        import open_clip
        open_clip.add_model_config(CONFIG_DIR)
        _registered = True


def create_model(model_name: str, pretrained=None, device="cpu"):
    """(model, train transform, eval transform, tokenizer) of an open_clip architecture. `pretrained` is an
    open_clip tag ("openai", "laion2b_s34b_b79k", ...) or the path of a checkpoint of that architecture."""
    import open_clip
    register_model_configs()
    if model_name not in open_clip.list_models():
        raise ValueError(f"--model {model_name!r} is not an open_clip model; e.g. ViT-B-32, ViT-L-14, clipmoe-tiny")
    if pretrained and Path(pretrained).suffix and not Path(pretrained).exists():
        raise FileNotFoundError(f"--pretrained {pretrained}: no such checkpoint file")
    try:
        model, preprocess_train, preprocess_val = open_clip.create_model_and_transforms(
            model_name, pretrained=pretrained, device=device)
    except (RuntimeError, AssertionError, KeyError) as exc:
        if not pretrained or not Path(pretrained).exists():
            raise
        # open_clip reports a foreign state dict as a load_state_dict RuntimeError, an assertion in its
        # position-embedding resize, or a missing key, depending on which tensor differs first.
        raise ValueError(f"--pretrained {pretrained}: not a checkpoint of {model_name} "
                         f"({type(exc).__name__}: {str(exc)[:300]})") from exc
    return model, preprocess_train, preprocess_val, open_clip.get_tokenizer(model_name)
