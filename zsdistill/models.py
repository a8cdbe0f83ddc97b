"""What the stages share about Hugging Face models and hardware: token limits, the device, its name."""

import os
import platform

import torch


def select_device(no_cuda: bool = False) -> torch.device:
    if not no_cuda and torch.cuda.is_available():
        return torch.device("cuda", int(os.environ.get("LOCAL_RANK", 0)))
    return torch.device("cpu")


def hardware_name(device: torch.device) -> str:
    """The GPU's name, or the CPU's model name and thread count: what speed numbers were measured on."""
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    try:
        with open("/proc/cpuinfo") as f:
            names = [line.split(":", 1)[1].strip() for line in f if line.startswith("model name")]
        cpu = names[0] if names else platform.processor()
    except OSError:
        cpu = platform.processor() or platform.machine()
    return f"{cpu} ({torch.get_num_threads()} threads)"


def resolve_max_length(tokenizer, model, max_length: int | None) -> int:
    """The user's --max_length, else the tokenizer's model_max_length, capped by the position embeddings
    (for teachers and students alike). `model`: the model or its config."""
    config = getattr(model, "config", model)
    limit = tokenizer.model_max_length if tokenizer.model_max_length and tokenizer.model_max_length < 1e6 else 512
    positions = getattr(config, "max_position_embeddings", None)
    if positions:
        # RoBERTa-style models offset positions by padding_idx + 1.
        offset = (
            (getattr(config, "pad_token_id", 0) or 0) + 1
            if config.model_type in ("roberta", "xlm-roberta", "camembert")
            else 0
        )
        limit = min(limit, positions - offset)
    return min(int(max_length), limit) if max_length else limit
