"""Reading and writing MDLM drafters in the ``kuleshov-group/mdlm-owt`` layout.

A drafter folder holds ``config.json`` (``model_type: "mdlm"`` and the
``MDLMConfig`` fields) and ``model.safetensors`` with ``backbone.*`` weights. The
same files load upstream with ``AutoModelForMaskedLM.from_pretrained(...,
trust_remote_code=True)``; here we need no remote code.

``resolve_drafter`` turns what the user typed as the speculative model (a folder,
a Hugging Face repo id already in the local cache, or the alias ``mdlm``) into a
local folder, or raises one clear error.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file

from vllm_specdiff.model import MDLM, MDLMConfig

CONFIG_FILE = "config.json"
WEIGHTS_FILE = "model.safetensors"
# A target folder may name its drafter in this file: {"drafter": "../tiny-mdlm"}.
PAIRING_FILE = "specdiff.json"
MDLM_ALIAS = "mdlm"
MDLM_OWT_REPO = "kuleshov-group/mdlm-owt"
GPT2_VOCAB_SIZE = 50257

_DTYPES = {
    "float32": torch.float32,
    "bfloat16": torch.bfloat16,
    "float16": torch.float16,
}


class DrafterNotFoundError(ValueError):
    """The speculative model could not be turned into a local MDLM folder."""


def torch_dtype(name: str) -> torch.dtype:
    return _DTYPES[name]


def native_bf16_matmul(device: torch.device) -> bool:
    """A CPU that multiplies bfloat16 in hardware (AVX512-BF16 or AMX)."""
    cpu = getattr(torch, "cpu", None)
    return device.type == "cpu" and any(
        getattr(cpu, name, lambda: False)()
        for name in ("_is_avx512_bf16_supported", "_is_amx_tile_supported"))


def drafter_dtypes(setting: str, target_dtype: torch.dtype,
                   device: torch.device) -> tuple[torch.dtype, torch.dtype]:
    """(the drafter's dtype, its linears' weight dtype) for a ``drafter_dtype`` setting.
    ``auto`` is the target's dtype, except that a float32 drafter on a CPU with native
    bfloat16 multiplies keeps its linears' weights in bfloat16: at small batch a
    drafting pass mostly streams weights the target's forward evicted from the caches,
    so half the bytes is a cheaper pass (``pair_bench_small_bf16_matmul.md``: +10%
    tokens/s at fixed gamma 8). LayerNorm, attention, the cache and q stay float32;
    time-conditioned drafters, which are not folded (``freeze_conditioning``), multiply
    in their own dtype. Exactness does not depend on it: q is whatever distribution
    the drafts were drawn from."""
    if setting != "auto":
        return torch_dtype(setting), torch_dtype(setting)
    if target_dtype == torch.float32 and native_bf16_matmul(device):
        return torch.float32, torch.bfloat16
    return target_dtype, target_dtype


def read_config(folder: str | os.PathLike) -> MDLMConfig:
    path = Path(folder) / CONFIG_FILE
    with open(path) as f:
        raw = json.load(f)
    if raw.get("model_type", "mdlm") != "mdlm":
        raise ValueError(
            f"speculative model {folder}: config.json has model_type="
            f"{raw.get('model_type')!r}; specdiff needs an MDLM drafter (model_type 'mdlm')"
        )
    return MDLMConfig.from_dict(raw)


def save_mdlm(model: MDLM, folder: str | os.PathLike, dtype: torch.dtype | None = None,
              extra_config: dict | None = None) -> None:
    """Write ``model`` in the mdlm-owt layout (``extra_config`` goes into config.json)."""
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    config = {
        "model_type": "mdlm",
        "architectures": ["MDLM"],
        **model.config.to_dict(),
        "return_dict": False,
        **(extra_config or {}),
    }
    (folder / CONFIG_FILE).write_text(json.dumps(config, indent=2) + "\n")
    state = {
        k: (v.to(dtype) if dtype is not None and v.is_floating_point() else v)
        .detach().cpu().contiguous()
        for k, v in model.state_dict().items()
    }
    save_file(state, str(folder / WEIGHTS_FILE), metadata={"format": "pt"})


def load_mdlm(folder: str | os.PathLike, device: torch.device | str = "cpu",
              dtype: torch.dtype = torch.float32) -> MDLM:
    """Load an MDLM from a local folder in the mdlm-owt layout, in eval mode."""
    cfg = read_config(folder)
    weights = Path(folder) / WEIGHTS_FILE
    if not weights.exists():
        raise FileNotFoundError(f"speculative model {folder}: {WEIGHTS_FILE} is missing")
    with torch.device("meta"):
        model = MDLM(cfg)
    state = load_file(str(weights), device=str(device))
    # inv_freq is derived data; older files may lack it, so it is rebuilt if absent.
    missing, unexpected = model.load_state_dict(state, strict=False, assign=True)
    missing = [k for k in missing if not k.endswith("rotary_emb.inv_freq")]
    if missing or unexpected:
        raise ValueError(
            f"speculative model {folder}: weights do not match the MDLM layout "
            f"(missing {missing[:5]}, unexpected {unexpected[:5]})"
        )
    rotary = model.backbone.rotary_emb
    if rotary.inv_freq.is_meta:
        head_dim = cfg.hidden_dim // cfg.n_heads
        rotary.inv_freq = 1.0 / (
            10_000 ** (torch.arange(0, head_dim, 2, device=device).float() / head_dim)
        )
    model = model.to(device=device)
    # Norm weights and inv_freq stay float32: both are computed in float32.
    for name, p in model.named_parameters():
        if "norm" not in name:
            p.data = p.data.to(dtype)
    return model.eval().requires_grad_(False)


def _hf_cached_snapshot(repo_id: str) -> str | None:
    """The local snapshot of ``repo_id`` in the Hugging Face cache; None when it is not
    cached. Other failures (a broken cache, no permission) raise, saying what failed."""
    from huggingface_hub import snapshot_download
    from huggingface_hub.errors import LocalEntryNotFoundError

    try:
        return snapshot_download(repo_id, local_files_only=True,
                                 allow_patterns=[CONFIG_FILE, WEIGHTS_FILE, "*.py"])
    except LocalEntryNotFoundError:
        return None
    except OSError as e:
        raise DrafterNotFoundError(
            f"speculative model {repo_id!r}: reading it from the Hugging Face cache failed: {e}"
        ) from e


def _target_vocab_size(target: str) -> tuple[int | None, str]:
    """(vocab size, "") or (None, why the target's config could not be read)."""
    from transformers import AutoConfig

    try:
        return AutoConfig.from_pretrained(target).vocab_size, ""
    except (OSError, ValueError) as e:
        return None, f"the target's config could not be read ({e})"


def resolve_drafter(name: str | None, target: str) -> str:
    """Local folder of the drafter named ``name`` for ``target`` (see module doc)."""
    if not name:
        raise DrafterNotFoundError(
            "speculative model is not set: specdiff needs an MDLM drafter "
            "(a folder in the mdlm-owt layout, a cached Hugging Face repo id, or 'mdlm')"
        )
    if name == MDLM_ALIAS:
        return _resolve_alias(target)
    if os.path.isdir(name):
        if not (Path(name) / CONFIG_FILE).exists():
            raise DrafterNotFoundError(f"speculative model {name!r}: no {CONFIG_FILE} in folder")
        return str(Path(name).resolve())
    if "/" in name and not os.path.exists(name) and not name.startswith((".", "/")):
        snapshot = _hf_cached_snapshot(name)
        if snapshot:
            return snapshot
        raise DrafterNotFoundError(
            f"speculative model {name!r}: not a local folder and not in the Hugging Face "
            "cache (this machine may be offline; download it first or pass a folder)"
        )
    raise DrafterNotFoundError(f"speculative model {name!r}: no such folder")


def _resolve_alias(target: str) -> str:
    looked = []
    pairing = Path(target) / PAIRING_FILE
    if pairing.is_file():
        drafter = json.loads(pairing.read_text()).get("drafter")
        if drafter:
            path = (Path(target) / drafter).resolve()
            if (path / CONFIG_FILE).exists():
                return str(path)
            looked.append(f"{pairing} names {drafter!r}, which has no {CONFIG_FILE}")
    else:
        looked.append(f"no {PAIRING_FILE} in the target folder")
    vocab, unreadable = _target_vocab_size(target)
    if vocab in (GPT2_VOCAB_SIZE, 50304):
        snapshot = _hf_cached_snapshot(MDLM_OWT_REPO)
        if snapshot:
            return snapshot
        looked.append(f"{MDLM_OWT_REPO} (GPT-2 tokenizer target) is not in the Hugging Face cache")
    else:
        looked.append(unreadable or f"the target does not use the GPT-2 vocabulary, so "
                                    f"{MDLM_OWT_REPO} does not fit")
    raise DrafterNotFoundError(
        f"speculative model 'mdlm': no MDLM drafter found for target {target!r}: "
        + "; ".join(looked) + ". Pass the drafter folder as the speculative model."
    )
