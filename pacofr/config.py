"""Typed configuration: dataclasses, presets, YAML files and dotted overrides.

    cfg = load_config("tiny", ["model.codebook.num_codes=128", "masking.region_prob=1.0"])
    cfg = load_config("demo")                       # a config shipped in configs/, by name
    cfg = load_config("my_run.yaml", ["train.deepspeed=zero2"])

A YAML file may start from a preset (`preset: tiny`) and sets only what it changes. Every key is
checked: an unknown or mistyped key fails naming it (with the closest known key), a value of
the wrong type fails naming key and type.

Names are found from any working directory: a config is a preset (PRESETS), a YAML file, or the
name of one shipped in the package (`pacofr.configs`, the repository's configs/); likewise
`train.deepspeed` is a DeepSpeed JSON file or the name of a shipped one (zero1, zero2, zero3),
which is resolved here to its path, so the engine always reads a file.
"""

import dataclasses
import difflib
import math
import os
import typing
from dataclasses import dataclass, field
from pathlib import Path

from . import configs as _shipped_configs


class ConfigError(ValueError):
    pass


@dataclass
class EncoderConfig:
    embed_dim: int = 768
    depth: int = 12
    num_heads: int = 12
    mlp_ratio: float = 4.0


@dataclass
class DecoderConfig:
    embed_dim: int = 512
    depth: int = 8
    num_heads: int = 16
    mlp_ratio: float = 4.0


@dataclass
class CodebookConfig:
    num_codes: int = 8192
    belief_dim: int = 256  # width of the belief space where code keys live
    belief_hidden: int = 1024  # hidden width of the Belief Predictor MLP
    topk: int = 4  # candidates mixed into a replacing patch
    temperature: float = 1.0
    mixing: str = "soft"  # soft | gumbel (straight-through)
    ema_decay: float = 0.99  # incubation: codes are an EMA of their assigned patches
    dead_code_threshold: float = 0.05  # restart a code whose EMA usage count falls below this


@dataclass
class ModelConfig:
    img_size: int = 224
    patch_size: int = 16
    in_chans: int = 3
    attn_impl: str = "pacofr"  # pacofr (masked_attention) | sdpa (PyTorch, a boolean mask), for comparison
    encoder: EncoderConfig = field(default_factory=EncoderConfig)
    decoder: DecoderConfig = field(default_factory=DecoderConfig)
    codebook: CodebookConfig = field(default_factory=CodebookConfig)


@dataclass
class MaskingConfig:
    ratio_min: float = 0.40  # masked fraction of patches, drawn per image in [min, max]
    ratio_max: float = 0.60
    region_prob: float = 0.5  # probability to mask whole semantic regions first
    regions_max: int = 2  # 1..regions_max whole regions
    block_min: int = 1  # side (patches) of the blocks that grow the mask to its target
    block_max: int = 4
    replace_ratio: float = 0.15  # fraction of visible patches replaced by codebook mixtures
    background_replace_weight: float = 0.25  # region-aware: background is replaced less often


@dataclass
class LossConfig:
    norm_pix: bool = True
    eps: float = 1e-6
    weight_masked: float = 1.0
    weight_replaced: float = 1.0
    weight_visible: float = 0.0
    w_sc: float = 0.1
    w_belief_incubation: float = 1.0
    w_belief: float = 0.1
    w_commit: float = 0.25


@dataclass
class DataConfig:
    source: str = "faces"  # "faces" (embedded), an image folder, a file list (.txt), a RecordIO .rec, .tar shards
    landmarks: str = ""  # optional CSV or JSON file: relative path (RecordIO: record index) -> 5 (or 68) points
    labels: str = "none"  # none | folders (root/<identity>/...) | list (.txt lines 'path label'); RecordIO: its own
    align: str = "none"  # none | arcface: warp faces with landmarks to the ArcFace 5-point template
    min_size: int = 32  # smaller images are skipped (and counted)
    max_pixels: int = 40_000_000  # pixel budget, from the header: larger JPEGs are drafted, others skipped
    scale_min: float = 0.85  # random resized crop: area fraction in [scale_min, 1]
    ratio_max: float = 1.1  # and aspect ratio in [1 / ratio_max, ratio_max]
    hflip: float = 0.5
    color_jitter: float = 0.1  # brightness / contrast / saturation strength
    num_workers: int = 2
    shuffle_buffer: int = 1000  # WebDataset shards, and DALI's MXNet reader (data.dali_reader=mxnet)
    decoder: str = "pil"  # pil (decode in DataLoader workers) | dali (NVIDIA DALI, pacofr/data/dali.py)
    dali_device: str = "auto"  # dali: mixed (GPU decode) | cpu; auto = mixed on a GPU, cpu otherwise
    dali_threads: int = 4  # dali: CPU threads of its pipeline
    # dali, RecordIO: mxnet (DALI's own reader) | python (DataLoader workers read by offset);
    # auto = mxnet for a .rec under data.decoder=dali, python otherwise
    dali_reader: str = "auto"


@dataclass
class TrainConfig:
    batch_size: int = 256  # global batch (all ranks, one optimizer step, accumulation included)
    accum_steps: int = 1
    epochs: int = 400
    max_steps: int = 0  # stop after this many steps (0 = all epochs); the lr schedule still spans all epochs
    incubation_epochs: int = 1
    blr: float = 1.5e-4  # lr = blr * batch_size / 256
    warmup_epochs: float = 40.0
    min_lr: float = 0.0
    weight_decay: float = 0.05
    beta1: float = 0.9
    beta2: float = 0.95
    clip_grad: float = 3.0  # 0 = off
    max_nonfinite: int = 20  # stop after this many non-finite losses in a row
    seed: int = 0
    ckpt_every: int = 1000  # steps
    keep_last: int = 3
    log_every: int = 10
    image_every: int = 500
    deepspeed: str = ""  # DeepSpeed JSON file or preset (zero1|zero2|zero3): ZeRO (engine/zero.py); "" = DDP


@dataclass
class FinetuneConfig:
    """Recognition fine-tuning (`pacofr finetune-recognition`, engine/finetune.py). epochs, blr,
    warmup_epochs and weight_decay take the place of train's; the other train keys apply."""
    num_classes: int = 0  # identities; 0 = the dataset's num_classes (RecordIO's header says it)
    embedding_size: int = 512
    dropout: float = 0.0  # in the head, before its linear map
    margin: str = "arcface"  # arcface | cosface
    arcface_m: float = 0.5  # additive angular margin
    cosface_m: float = 0.35  # additive cosine margin
    s: float = 64.0  # logit scale
    easy_margin: bool = False  # arcface: the margin only where cos(theta) > 0 (else insightface's fallback)
    layer_decay: float = 0.75  # lr of encoder block i: lr * layer_decay ** (depth + 1 - (i + 1)); the head's: lr
    epochs: int = 20
    blr: float = 1e-3  # lr = blr * batch_size / 256
    warmup_epochs: float = 1.0
    weight_decay: float = 0.05
    eval_every: int = 2000  # steps between verification runs (0 = at the end only)
    eval_bins: str = ""  # insightface .bin verification sets, comma-separated (--eval-bin)
    eval_batch_size: int = 64


@dataclass
class Config:
    model: ModelConfig = field(default_factory=ModelConfig)
    masking: MaskingConfig = field(default_factory=MaskingConfig)
    loss: LossConfig = field(default_factory=LossConfig)
    data: DataConfig = field(default_factory=DataConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    finetune: FinetuneConfig = field(default_factory=FinetuneConfig)


# Presets are overrides of the defaults; the defaults are the paper-scale ViT-B/16 at 224 px.
PRESETS: dict[str, dict] = {
    "vit_base_patch16_224": {},
    "tiny": {
        "model": {
            "img_size": 64,
            "patch_size": 8,
            "encoder": {"embed_dim": 96, "depth": 4, "num_heads": 3},
            "decoder": {"embed_dim": 64, "depth": 2, "num_heads": 2},
            "codebook": {"num_codes": 128, "belief_dim": 32, "belief_hidden": 128},
        },
        "data": {"num_workers": 0},
        "train": {"batch_size": 16, "epochs": 40, "blr": 6.4e-3, "warmup_epochs": 2.0,
                  "ckpt_every": 100, "log_every": 5, "image_every": 50},
    },
}


def _check_type(key: str, value, tp):
    if tp is float and isinstance(value, int) and not isinstance(value, bool):
        return float(value)
    if tp is float and isinstance(value, str):  # (YAML 1.1 reads 1e-4, without a dot, as a string)
        try:
            return float(value)
        except ValueError:
            pass
    if not isinstance(value, tp) or (tp is int and isinstance(value, bool)):
        raise ConfigError(f"config key '{key}' must be {tp.__name__}, got {value!r}")
    return value


def _merge(obj, updates: dict, prefix: str = ""):
    """Apply a nested dict of updates to a dataclass, validating every key and type."""
    if not isinstance(updates, dict):
        raise ConfigError(f"config key '{prefix.rstrip('.')}' must be a mapping, got {updates!r}")
    hints = typing.get_type_hints(type(obj))
    names = [f.name for f in dataclasses.fields(obj)]
    for key, value in updates.items():
        dotted = prefix + str(key)
        if key not in names:
            close = difflib.get_close_matches(str(key), names, n=1)
            hint = f" (did you mean '{prefix}{close[0]}'?)" if close else f" (known: {', '.join(names)})"
            raise ConfigError(f"unknown config key '{dotted}'{hint}")
        if dataclasses.is_dataclass(hints[key]):
            _merge(getattr(obj, key), value, dotted + ".")
        else:
            setattr(obj, key, _check_type(dotted, value, hints[key]))
    return obj


def _yaml():
    """PyYAML, imported when a file or an override is read: presets need none (the GPU
    machines that run benchmarks/ may lack it)."""
    import yaml

    return yaml


def _parse_yaml(text: str, where: str, advice: str):
    """`text` parsed as YAML; a syntax error is one line naming `where`, the place and the problem."""
    yaml = _yaml()
    try:
        return yaml.safe_load(text)
    except yaml.YAMLError as err:
        mark, context = getattr(err, "problem_mark", None), getattr(err, "context_mark", None)
        problem = getattr(err, "problem", None) or str(err).strip().splitlines()[0]
        line = f"line {mark.line + 1}, " if mark is not None and "\n" in text.strip() else ""
        at = f"{line}column {mark.column + 1}: " if mark is not None else ""
        since = (f", {err.context} from line {context.line + 1}"
                 if context is not None and mark is not None and context.line != mark.line else "")
        raise ConfigError(f"{where} is not valid YAML ({at}{problem}{since}): {advice}") from None


def parse_override(text: str) -> dict:
    """'a.b.c=value' -> {'a': {'b': {'c': value}}}, the value parsed as YAML (so 1, 0.5, true)."""
    if "=" not in text:
        raise ConfigError(f"override '{text}' must look like key.path=value")
    key, raw = text.split("=", 1)
    value = _parse_yaml(raw, f"override '{text}': the value of {key.strip()}",
                        f"fix it, or quote it if it is text: --set '{key.strip()}=\"{raw}\"'") if raw.strip() else ""
    for part in reversed(key.strip().split(".")):
        value = {part: value}
    return value


def _shipped(suffix: str) -> dict[str, Path]:
    """The package's config files with this suffix, by name (the stem; the file name works too)."""
    files = sorted(Path(_shipped_configs.__file__).parent.glob(f"*{suffix}"))
    return {**{p.name: p for p in files}, **{p.stem: p for p in files}}


def config_names() -> list[str]:
    """What `load_config` (and `--config`) accept by name, from any directory."""
    return sorted(set(PRESETS) | {Path(name).stem for name in _shipped(".yaml")})


def deepspeed_presets() -> list[str]:
    """The shipped DeepSpeed configs that `train.deepspeed` (and `--deepspeed_config`) accept by name."""
    return sorted({Path(name).stem for name in _shipped(".json")})


def resolve_deepspeed(value: str) -> str:
    """`train.deepspeed` as a file path: a file as given, a shipped config's name as its path."""
    if not value or Path(value).is_file():
        return value
    shipped = _shipped(".json")
    if value not in shipped:
        raise ConfigError(f"train.deepspeed '{value}' is neither a file nor a preset "
                          f"({', '.join(deepspeed_presets())})")
    return str(shipped[value])


def load_config(source: str | Path | None = "vit_base_patch16_224", overrides: list[str] = ()) -> Config:
    """A preset name, YAML path or shipped config's name, then dotted overrides, validated."""
    updates: dict = {}
    if source is not None and str(source) not in PRESETS:
        path = Path(source)
        if not path.is_file():
            path = _shipped(".yaml").get(str(source))
        if path is None:
            names = ", ".join(config_names())
            if Path(source).is_dir():
                raise ConfigError(f"config '{source}' is a folder: give a YAML file or a preset ({names})")
            raise ConfigError(f"config '{source}' is neither a preset ({names}) nor a file")
        try:
            text = path.read_text()
        except UnicodeDecodeError:
            raise ConfigError(f"config file {path} is not UTF-8 text: give a YAML file") from None
        updates = _parse_yaml(text, f"config file {path}", "fix the file at that line") or {}
        if not isinstance(updates, dict):
            raise ConfigError(f"config file {path} must hold a mapping")
        source = updates.pop("preset", "vit_base_patch16_224")
        if not isinstance(source, str) or source not in PRESETS:
            raise ConfigError(f"{path}: unknown preset '{source}' (known: {', '.join(PRESETS)})")
    cfg = _merge(Config(), PRESETS[source or "vit_base_patch16_224"])
    _merge(cfg, updates)
    for text in overrides:
        _merge(cfg, parse_override(text))
    cfg.train.deepspeed = resolve_deepspeed(cfg.train.deepspeed)
    validate(cfg)
    return cfg


# The range of each numeric key that has one: (key, lowest, highest), inclusive unless the
# bound is in a 1-tuple, which excludes it; None: unbounded. Floats must also be finite.
_RANGES = [
    *[(f"model.{k}", 1, None) for k in ("img_size", "patch_size", "in_chans")],
    *[(f"model.{part}.{k}", 1, None) for part in ("encoder", "decoder") for k in ("embed_dim", "depth", "num_heads")],
    ("model.encoder.mlp_ratio", (0,), None), ("model.decoder.mlp_ratio", (0,), None),
    *[(f"model.codebook.{k}", 1, None) for k in ("num_codes", "belief_dim", "belief_hidden")],
    ("model.codebook.temperature", (0,), None), ("model.codebook.ema_decay", 0, (1,)),
    ("model.codebook.dead_code_threshold", 0, None),
    ("masking.region_prob", 0, 1), ("masking.regions_max", 1, None), ("masking.replace_ratio", 0, 1),
    ("masking.background_replace_weight", 0, None),
    ("loss.eps", (0,), None),
    *[(f"loss.{k}", 0, None) for k in ("weight_masked", "weight_replaced", "weight_visible", "w_sc",
                                        "w_belief_incubation", "w_belief", "w_commit")],
    ("data.min_size", 1, None), ("data.scale_min", (0,), 1), ("data.ratio_max", 1, None), ("data.hflip", 0, 1),
    ("data.color_jitter", 0, (1,)), ("data.num_workers", 0, None), ("data.shuffle_buffer", 0, None),
    ("data.dali_threads", 1, None), ("data.max_pixels", 1, None),
    *[(f"train.{k}", 1, None) for k in ("batch_size", "accum_steps", "epochs", "max_nonfinite", "ckpt_every",
                                         "log_every")],
    *[(f"train.{k}", 0, None) for k in ("max_steps", "incubation_epochs", "warmup_epochs", "min_lr", "weight_decay",
                                         "clip_grad", "keep_last", "image_every")],
    ("train.blr", (0,), None), ("train.beta1", 0, (1,)), ("train.beta2", 0, (1,)),
    *[(f"finetune.{k}", 0, None) for k in ("num_classes", "warmup_epochs", "weight_decay", "eval_every")],
    *[(f"finetune.{k}", 1, None) for k in ("embedding_size", "epochs", "eval_batch_size")],
    ("finetune.dropout", 0, (1,)), ("finetune.arcface_m", 0, (math.pi,)), ("finetune.cosface_m", 0, 2),
    ("finetune.s", (0,), None), ("finetune.layer_decay", (0,), 1), ("finetune.blr", (0,), None),
]


def _check_range(cfg: Config, key: str, lo, hi) -> None:
    value = cfg
    for part in key.split("."):
        value = getattr(value, part)
    below = lo is not None and (value <= lo[0] if isinstance(lo, tuple) else value < lo)
    above = hi is not None and (value >= hi[0] if isinstance(hi, tuple) else value > hi)
    if below or above or value != value or value in (float("inf"), float("-inf")):
        left = "(-inf" if lo is None else f"({lo[0]}" if isinstance(lo, tuple) else f"[{lo}"
        right = "inf)" if hi is None else f"{hi[0]})" if isinstance(hi, tuple) else f"{hi}]"
        raise ConfigError(f"config key '{key}' must be in {left}, {right}, got {value!r}")


def validate(cfg: Config) -> None:
    """Each numeric key's range, and checks across keys that types alone cannot express."""
    for key, lo, hi in _RANGES:
        _check_range(cfg, key, lo, hi)
    m, mk = cfg.model, cfg.masking
    if m.img_size % m.patch_size:
        raise ConfigError(f"model.img_size={m.img_size} must be divisible by model.patch_size={m.patch_size}")
    for name, sub in (("encoder", m.encoder), ("decoder", m.decoder)):
        if sub.embed_dim % sub.num_heads:
            raise ConfigError(f"model.{name}.embed_dim={sub.embed_dim} must be divisible by num_heads={sub.num_heads}")
    if not 0.0 <= mk.ratio_min <= mk.ratio_max < 1.0:
        raise ConfigError(f"masking ratios need 0 <= ratio_min <= ratio_max < 1, got {mk.ratio_min}, {mk.ratio_max}")
    if not 1 <= mk.block_min <= mk.block_max:
        raise ConfigError(f"masking blocks need 1 <= block_min <= block_max, got {mk.block_min}, {mk.block_max}")
    if not 1 <= m.codebook.topk <= min(32, m.codebook.num_codes):
        raise ConfigError(f"model.codebook.topk={m.codebook.topk} must be in [1, min(32, num_codes)]")
    if m.attn_impl not in ("pacofr", "sdpa"):
        raise ConfigError(f"model.attn_impl must be 'pacofr' or 'sdpa', got '{m.attn_impl}'")
    if cfg.data.decoder not in ("pil", "dali"):
        raise ConfigError(f"data.decoder must be 'pil' or 'dali', got '{cfg.data.decoder}'")
    if cfg.data.dali_reader not in ("auto", "python", "mxnet"):
        raise ConfigError(f"data.dali_reader must be 'auto', 'python' or 'mxnet', got '{cfg.data.dali_reader}'")
    if cfg.data.labels not in ("none", "folders", "list"):
        raise ConfigError(f"data.labels must be 'none', 'folders' or 'list', got '{cfg.data.labels}'")
    if cfg.data.align not in ("none", "arcface"):
        raise ConfigError(f"data.align must be 'none' or 'arcface', got '{cfg.data.align}'")
    if cfg.data.dali_device not in ("auto", "mixed", "cpu"):
        raise ConfigError(f"data.dali_device must be 'auto', 'mixed' or 'cpu', got '{cfg.data.dali_device}'")
    if cfg.finetune.margin not in ("arcface", "cosface"):
        raise ConfigError(f"finetune.margin must be 'arcface' or 'cosface', got '{cfg.finetune.margin}'")
    if m.codebook.mixing not in ("soft", "gumbel"):
        raise ConfigError(f"model.codebook.mixing must be 'soft' or 'gumbel', got '{m.codebook.mixing}'")


def to_dict(cfg: Config) -> dict:
    return dataclasses.asdict(cfg)


def flat_keys(tree: dict, prefix: str = "") -> dict:
    """A nested dict (a config as `to_dict` gives it, or as config.yaml holds it) as
    {"dotted.key": value}."""
    out = {}
    for key, value in tree.items():
        if isinstance(value, dict):
            out.update(flat_keys(value, f"{prefix}{key}."))
        else:
            out[f"{prefix}{key}"] = value
    return out


def check_output_path(path: str | Path, flag: str, folder: bool) -> None:
    """Refuses an output path that cannot be written (a `folder` to make, or a file), naming
    `flag`, before anything is computed or written: a folder where a file goes, or a file
    where a folder goes or above it."""
    path = Path(path)
    if path.exists() and path.is_dir() != folder:
        raise ConfigError(f"{flag} {path} is a file, not a folder: give a folder for the run" if folder else
                          f"{flag} {path} is a folder, not a file: give a file name, e.g. {path / 'result.json'}")
    above = next(p for p in path.absolute().parents if p.exists())
    if not above.is_dir():
        raise ConfigError(f"{flag} {path}: {above} is a file, so nothing can be made under it: give another path")
    target = path if path.exists() else above
    if not os.access(target, os.W_OK | (os.X_OK if target.is_dir() else 0)):
        raise ConfigError(f"{flag} {path}: no permission to write {'in ' if target.is_dir() else ''}{target}: "
                          "give another path")
