"""Diffusion backbone: a local diffusers pipeline directory in, a diffusers directory out.

Supported denoisers: UNet2DModel (unconditional or class-conditional, e.g. the built-in tiny-digits) and
UNet2DConditionModel (text-conditioned through the pipeline's CLIP text encoder). Schedulers: the DDPM
family (anything with `alphas_cumprod`, sampled with DDIM steps) and FlowMatchEulerDiscreteScheduler.
Only the denoiser is trained; every other component is copied unchanged when the model is saved.
"""
from __future__ import annotations

import copy
import json
import shutil
from dataclasses import dataclass, field
from pathlib import Path

import torch
from torch import nn

from rlgen.diffusion.digits import parse_digit_prompt
from rlgen.errors import RlgenError, show_value
from rlgen.models import safe_load
from rlgen.models.backbone import ReferencePolicy, claiming_backbone
from rlgen.models.causal_lm import ModelConfig, quiet_transformers, replace_dir
from rlgen.models.locate import is_diffusion_dir, model_dir
from rlgen.models.safe_load import load_peft_adapter
from rlgen.plugins import registry

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}
INFO_FILE = "rlgen_diffusion.json"  # rlgen's notes on a pipeline: class names, recommended sampling
DENOISERS = ("unet", "transformer")
# The components DiffusionModel uses; any other entry of model_index.json is neither imported nor loaded
# (it is still copied when the model is saved).
USED_COMPONENTS = (*DENOISERS, "scheduler", "text_encoder", "tokenizer", "vae")
ALLOWED_LIBRARIES = ("diffusers", "transformers")


@dataclass
class DiffusionModelConfig(ModelConfig):
    """The model section of the image trainers: the shared one with an image model's defaults."""
    path: str = "tiny-digits"
    lora_target_modules: list[str] = field(default_factory=lambda: ["to_q", "to_k", "to_v", "to_out.0"])


def resolve_pipeline_path(name_or_path: str) -> Path:
    path = model_dir(name_or_path)
    if not path.exists():
        known = ", ".join(registry("model").names())
        raise RlgenError(f"unknown model '{name_or_path}': not a built-in name ({known}) nor an existing directory")
    if not is_diffusion_dir(path):
        other = claiming_backbone(name_or_path)  # say what it is when another backbone knows
        what = f"{other.description}, not " if other is not None else "not "
        raise RlgenError(f"{path} is {what}a diffusers pipeline directory (no model_index.json)")
    return path


def _quiet_diffusers() -> None:
    import diffusers

    quiet_transformers()
    diffusers.utils.logging.set_verbosity_error()
    diffusers.utils.logging.disable_progress_bar()


def _allowed_bases() -> tuple[type, ...]:
    """What a model_index.json may name: diffusers models and schedulers, transformers models and tokenizers."""
    import diffusers
    import transformers

    return (diffusers.ModelMixin, diffusers.SchedulerMixin, transformers.PreTrainedModel,
            transformers.PreTrainedTokenizerBase)


def component_class(path: Path, name: str, spec) -> type:
    """The class that model_index.json names for component `name`, from an allow-list: only the
    `diffusers` and `transformers` packages are ever imported, never a module the file names."""
    import importlib

    where = f"{path / 'model_index.json'}: key '{name}'"
    if not (isinstance(spec, list) and len(spec) == 2 and all(isinstance(part, str) for part in spec)):
        raise RlgenError(f"{where} must be [library, class name], got {show_value(spec)}")
    library, class_name = spec
    if library not in ALLOWED_LIBRARIES:
        raise RlgenError(f"{where} names library {show_value(library)}; rlgen loads only "
                         f"{' and '.join(ALLOWED_LIBRARIES)} classes")
    cls = getattr(importlib.import_module(library), class_name, None) \
        if class_name.isidentifier() and not class_name.startswith("_") else None
    if not (isinstance(cls, type) and issubclass(cls, _allowed_bases())):
        raise RlgenError(f"{where} names {show_value(f'{library}.{class_name}')}, which is not a {library} model, "
                         "scheduler or tokenizer class")
    return cls


def _load_component(path: Path, name: str, spec, dtype=None):
    import diffusers
    import transformers

    cls = component_class(path, name, spec)
    directory = path / name
    if issubclass(cls, diffusers.ModelMixin):
        safe_load.check_safetensors(directory, f"diffusers.{cls.__name__}")
        kwargs = safe_load.diffusers_weights_kwargs()
    elif issubclass(cls, transformers.PreTrainedModel):
        safe_load.check_model_dir(directory, f"transformers.{cls.__name__}")
        kwargs = safe_load.weights_kwargs()
    elif issubclass(cls, transformers.PreTrainedTokenizerBase):
        safe_load.check_no_custom_code(directory)
        kwargs = safe_load.no_download_kwargs()
    else:  # a scheduler: a JSON config
        kwargs = {"local_files_only": True}
    if dtype is not None and hasattr(cls, "parameters"):
        kwargs["torch_dtype"] = dtype
    with safe_load.load_errors(f"cannot load '{name}' ({cls.__name__}) from {directory}"):
        return cls.from_pretrained(str(directory), **kwargs)


class DiffusionModel(nn.Module):
    """The pieces sampling and training need, behind one interface:

    - `conditioning(prompts, records)` / `null_conditioning(n)`: class labels or text embeddings;
    - `predict(x, t, cond, null, guidance_scale)`: the denoiser output with classifier-free guidance;
    - `decode(latents)`: images in [0, 1];
    - `family`: "ddim" (DDPM-family scheduler, DDIM steps) or "flow" (flow matching, Euler/SDE steps).
    """

    def __init__(self, path: Path, components: dict, info: dict):
        super().__init__()
        self.path = Path(path)
        self.info = info
        self.denoiser_name = next((n for n in DENOISERS if n in components), None)
        if self.denoiser_name is None:
            raise RlgenError(f"{path}: no denoiser (expected one of: {', '.join(DENOISERS)}) in model_index.json")
        self.denoiser = components[self.denoiser_name]
        self.scheduler = components.get("scheduler")
        if self.scheduler is None:
            raise RlgenError(f"{path}: no scheduler in model_index.json")
        self.text_encoder = components.get("text_encoder")
        self.tokenizer = components.get("tokenizer")
        self.vae = components.get("vae")
        for frozen in (self.text_encoder, self.vae):
            if frozen is not None:
                frozen.requires_grad_(False).eval()
        kind = type(self.denoiser).__name__
        if kind not in ("UNet2DModel", "UNet2DConditionModel"):
            raise RlgenError(f"{path}: denoiser {kind} is not supported yet (UNet2DModel, UNet2DConditionModel)")
        self.family = "flow" if "FlowMatch" in type(self.scheduler).__name__ else "ddim"
        if self.family == "ddim" and not hasattr(self.scheduler, "alphas_cumprod"):
            raise RlgenError(f"{path}: scheduler {type(self.scheduler).__name__} has no alphas_cumprod (DDPM family) and is not flow matching")
        self.text_conditioned = kind == "UNet2DConditionModel"
        self.class_names = [str(c).lower() for c in info.get("class_names", [])]
        # the frozen reference (KL, DPO), built by the diffusers backbone's reference_policy()
        self.reference: ReferencePolicy | None = None
        self.lora = False

    # --- shapes and conditioning ---
    @property
    def base_denoiser(self) -> nn.Module:
        inner = self.denoiser
        return inner.get_base_model() if hasattr(inner, "get_base_model") else inner

    @property
    def latent_shape(self) -> tuple[int, int, int]:
        cfg = self.base_denoiser.config
        size = cfg.sample_size
        h, w = (size, size) if isinstance(size, int) else tuple(size)
        return (cfg.in_channels, h, w)

    @property
    def prediction_type(self) -> str:
        return getattr(self.scheduler.config, "prediction_type", "epsilon") or "epsilon"

    @property
    def num_classes(self) -> int | None:
        return getattr(self.base_denoiser.config, "num_class_embeds", None)

    @property
    def device(self) -> torch.device:
        return next(self.denoiser.parameters()).device

    def class_of(self, prompt: str, record: dict | None = None) -> int:
        if record is not None and isinstance(record.get("label"), int):
            return int(record["label"])
        text = str(prompt).strip().lower()
        if text in self.class_names:
            return self.class_names.index(text)
        if self.info.get("prompt_parser") == "digits":
            label = parse_digit_prompt(text)
            if label is not None:
                return label
        if text.isdigit() and int(text) < (len(self.class_names) or self.num_classes - 1):  # the last class is the null one
            return int(text)
        known = ", ".join(self.class_names) or "class numbers"
        raise RlgenError(f"prompt {prompt!r} names no class of {self.path.name} (known: {known})")

    def check_prompts(self, records: list[dict]) -> None:
        """Fail before any sampling when a class-conditional model is given a prompt naming no class."""
        if self.num_classes and not self.text_conditioned:
            for record in records:
                self.class_of(str(record["prompt"]), record)

    def conditioning(self, prompts: list[str], records: list[dict] | None = None) -> torch.Tensor | None:
        if self.text_conditioned:
            return self._encode_text(prompts)
        if self.num_classes:
            records = records or [None] * len(prompts)
            return torch.tensor([self.class_of(p, r) for p, r in zip(prompts, records)], device=self.device)
        return None

    def null_conditioning(self, n: int) -> torch.Tensor | None:
        if self.text_conditioned:
            return self._encode_text([""] * n)
        if self.num_classes:
            null = self.info.get("null_class", self.num_classes - 1)
            return torch.full((n,), int(null), dtype=torch.long, device=self.device)
        return None

    @torch.no_grad()
    def _encode_text(self, prompts: list[str]) -> torch.Tensor:
        if self.tokenizer is None or self.text_encoder is None:
            raise RlgenError(f"{self.path}: a text-conditioned denoiser needs 'tokenizer' and 'text_encoder' components")
        tokens = self.tokenizer(list(prompts), padding="max_length", max_length=self.tokenizer.model_max_length,
                                truncation=True, return_tensors="pt")
        return self.text_encoder(tokens.input_ids.to(self.device))[0]

    # --- the denoiser ---
    def _forward(self, net, x, t, cond):
        x = x.to(_weight_dtype(net))  # float32 latents into a bf16 / fp16 denoiser (model.dtype, run.precision = bf16)
        t = torch.as_tensor(t, device=x.device)
        if t.ndim == 0:
            t = t.expand(x.shape[0])
        if self.text_conditioned:
            return net(x, t, encoder_hidden_states=cond).sample
        if cond is not None:
            return net(x, t, class_labels=cond).sample
        return net(x, t).sample

    def predict(self, x, t, cond, null=None, guidance_scale: float = 1.0, reference: bool = False):
        """Denoiser output; with guidance_scale != 1 the classifier-free-guided combination
        uncond + w * (cond - uncond), both branches in one batched forward (as DDPO trains it).
        `reference` runs the reference policy instead (the backbone's reference_policy() builds it)."""
        if not reference:
            return self._guided(self.denoiser, x, t, cond, null, guidance_scale)
        if self.reference is None:
            raise RuntimeError("predict(reference=True) before the reference policy was built")
        with self.reference.forward() as net:
            return self._guided(net, x, t, cond, null, guidance_scale)

    def _guided(self, net, x, t, cond, null, guidance_scale: float):
        if guidance_scale == 1.0 or cond is None:
            return self._forward(net, x, t, cond)
        t = torch.as_tensor(t, device=x.device)
        both = self._forward(net, torch.cat([x, x]), torch.cat([t.expand(x.shape[0])] * 2), torch.cat([null, cond]))
        uncond, conditional = both.chunk(2)
        return uncond + guidance_scale * (conditional - uncond)

    def _vae_scale(self) -> tuple[float, float]:
        cfg = self.vae.config
        return float(getattr(cfg, "scaling_factor", None) or 1.0), float(getattr(cfg, "shift_factor", None) or 0.0)

    def decode(self, latents: torch.Tensor) -> torch.Tensor:
        """Images in [0, 1] from final latents (through the VAE when the pipeline has one)."""
        if self.vae is not None:
            scaling, shift = self._vae_scale()
            latents = self.vae.decode((latents / scaling + shift).to(_weight_dtype(self.vae))).sample
        return (latents.float() / 2 + 0.5).clamp(0, 1)

    @torch.no_grad()
    def encode(self, images: torch.Tensor, batch_size: int = 64, source: str = "images") -> torch.Tensor:
        """The denoiser's clean samples x0 for training images [N, C, H, W] in [0, 1]: the pixels in [-1, 1],
        or the VAE's latent means (scaled and shifted as diffusers' training scripts do)."""
        pixels = images * 2 - 1
        if self.vae is None:
            encoded = pixels
        else:
            expected = getattr(self.vae.config, "in_channels", pixels.shape[1])
            if pixels.shape[1] == 1 and expected == 3:
                pixels = pixels.repeat(1, 3, 1, 1)
            scaling, shift = self._vae_scale()
            dtype = _weight_dtype(self.vae)
            parts = [self.vae.encode(part.to(self.device, dtype)).latent_dist.mean for part in pixels.split(batch_size)]
            encoded = (torch.cat(parts).float() - shift) * scaling
        if tuple(encoded.shape[1:]) != self.latent_shape:
            kind = "encode to" if self.vae is not None else "are"
            raise RlgenError(f"{source} {kind} {tuple(encoded.shape[1:])} but {self.path} denoises {self.latent_shape}")
        return encoded.cpu()

    # --- saving ---
    def save(self, out_dir: Path, merge_lora: bool = True) -> None:
        """Write a complete diffusers directory atomically; only the denoiser differs from the base."""
        out_dir = Path(out_dir)
        tmp = out_dir.with_name(f".{out_dir.name}.tmp")
        if tmp.exists():
            shutil.rmtree(tmp)
        shutil.copytree(self.path, tmp, ignore=shutil.ignore_patterns(self.denoiser_name, f"{self.denoiser_name}_lora"))
        net = self.denoiser
        if self.lora and merge_lora:
            net = copy.deepcopy(net).merge_and_unload()
        if self.lora and not merge_lora:
            shutil.copytree(self.path / self.denoiser_name, tmp / self.denoiser_name)
            net.save_pretrained(str(tmp / f"{self.denoiser_name}_lora"), safe_serialization=True)
        else:
            net.save_pretrained(str(tmp / self.denoiser_name), safe_serialization=True)
        replace_dir(tmp, out_dir)


def _weight_dtype(module: nn.Module) -> torch.dtype:
    """The dtype of a module's floating-point weights (what its inputs are cast to)."""
    return next((p.dtype for p in module.parameters() if p.is_floating_point()), torch.float32)


def add_lora(model: DiffusionModel, cfg: DiffusionModelConfig) -> None:
    from peft import LoraConfig, get_peft_model

    lora = LoraConfig(r=cfg.lora_r, lora_alpha=cfg.lora_alpha, lora_dropout=cfg.lora_dropout,
                      target_modules=list(cfg.lora_target_modules), init_lora_weights="gaussian")
    try:
        model.denoiser = get_peft_model(model.denoiser, lora)
    except ValueError as exc:
        raise RlgenError(f"config key 'model.lora_target_modules': {str(exc).splitlines()[0]}") from None
    model.lora = True


def load_diffusion_model(cfg: DiffusionModelConfig, adapter_dir: Path | None = None) -> DiffusionModel:
    """Load a pipeline directory (built-in name or path); LoRA attached when cfg.lora_r > 0
    (from `adapter_dir` when resuming)."""
    _quiet_diffusers()
    path = resolve_pipeline_path(cfg.path)
    try:
        index = json.loads((path / "model_index.json").read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise RlgenError(f"{path}/model_index.json: bad JSON ({exc})") from None
    if not isinstance(index, dict):
        raise RlgenError(f"{path}/model_index.json: expected a JSON object")
    info = json.loads((path / INFO_FILE).read_text()) if (path / INFO_FILE).is_file() else {}
    dtype = DTYPES[cfg.dtype]
    components = {}
    for name, spec in index.items():
        if name not in USED_COMPONENTS or (isinstance(spec, list) and spec and spec[0] is None):
            continue
        components[name] = _load_component(path, name, spec, dtype)
    model = DiffusionModel(path, components, info)
    lora_dir = path / f"{model.denoiser_name}_lora"
    if adapter_dir is None and lora_dir.is_dir():  # a directory saved with lora_merge_on_save = false
        model.denoiser = load_peft_adapter(model.denoiser, lora_dir).merge_and_unload()
    if adapter_dir is not None:
        model.denoiser = load_peft_adapter(model.denoiser, adapter_dir, is_trainable=True)
        model.lora = True
    elif cfg.lora_r > 0:
        add_lora(model, cfg)
    return model
