"""Model loading: ``.nemo`` archives, extracted folders, Hugging Face repo ids and ``random:<preset>`` specs;
and writing ``.nemo`` archives in the same format NeMo writes (tar of model_config.yaml, model_weights.ckpt and the
tokenizer files)."""

from __future__ import annotations

import hashlib
import io
import os
import re
import tarfile
import tempfile
from importlib import resources
from pathlib import Path

import torch
import yaml

from .config import ModelConfig, preset_config
from .model.asr import TransducerModel
from .tokenizer import Tokenizer

DTYPES = {"fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}
CACHE_DIR = Path(os.environ.get("TRT_ASR_CACHE", Path.home() / ".cache" / "trt_asr"))


class ModelLoadError(RuntimeError):
    pass


def default_model_spec(mode: str | None = None) -> str:
    """The shipped demo model if present, else a random-weight preset (clearly labelled as such).

    ``mode`` "cache-aware" / "cache_aware" picks the cache-aware demo model (the full-attention one cannot run that
    mode); any other mode (offline, buffered) the buffered one."""
    assets = resources.files("trt_asr.assets")
    names = ["demo-tdt-buffered.nemo"]
    if mode in ("cache-aware", "cache_aware"):
        names.insert(0, "demo-tdt-cache-aware.nemo")
    for name in names:
        if assets.joinpath(name).is_file():
            return str(assets.joinpath(name))
    return "random:parakeet-tdt-0.6b-v3"


def load_model(spec: str | None = None, device: str | torch.device = "cpu", dtype: str = "fp32") -> TransducerModel:
    spec = spec or default_model_spec()
    if spec.startswith("random:"):
        model = random_model(spec[len("random:"):])
    else:
        path = Path(spec).expanduser()
        if path.is_file():
            model = load_nemo(path)
        elif path.is_dir():
            model = load_folder(path)
        elif re.fullmatch(r"[\w.-]+/[\w.-]+", spec) and not path.exists():
            model = load_nemo(download_from_hub(spec))
        else:
            raise ModelLoadError(f"model {spec!r} not found: give a .nemo file, an extracted folder, a Hugging Face "
                                 f"repo id (org/name) or random:<preset>")
    if dtype not in DTYPES:
        raise ModelLoadError(f"unknown dtype {dtype!r}; use one of {', '.join(DTYPES)}")
    model.to(device=device)
    if dtype != "fp32":
        # the front end stays in float32 (as in NeMo); weights of the encoder, decoder and joint go to dtype
        for name in ("encoder", "decoder", "joint"):
            getattr(model, name).to(DTYPES[dtype])
    return model.eval()


# ----------------------------------------------------------------------------------------------- reading
def _find_tokenizer(folder: Path, cfg: dict) -> Path | None:
    value = (cfg.get("tokenizer") or {}).get("model_path")
    if value:
        name = str(value).replace("nemo:", "")
        for candidate in (folder / name, folder / Path(name).name):
            if candidate.is_file():
                return candidate
    found = sorted(folder.glob("*tokenizer.model")) or sorted(folder.glob("*.model"))
    return found[0] if found else None


def load_folder(folder: Path, name: str | None = None) -> TransducerModel:
    cfg_path = folder / "model_config.yaml"
    weights = folder / "model_weights.ckpt"
    if not cfg_path.is_file() or not weights.is_file():
        raise ModelLoadError(f"{folder} is not a NeMo model folder (needs model_config.yaml and model_weights.ckpt)")
    cfg_dict = yaml.safe_load(cfg_path.read_text())
    tok_path = _find_tokenizer(folder, cfg_dict)
    tokenizer = Tokenizer(tok_path) if tok_path else None
    state = torch.load(weights, map_location="cpu", weights_only=True)
    if "state_dict" in state and isinstance(state["state_dict"], dict):
        state = state["state_dict"]
    vocab = state["decoder.prediction.embed.weight"].shape[0] - 1
    cfg = ModelConfig.from_nemo_dict(cfg_dict, vocab_size=vocab)
    if tokenizer is not None and tokenizer.vocab_size != vocab:
        raise ModelLoadError(f"tokenizer has {tokenizer.vocab_size} pieces but the model predicts {vocab}")
    model = TransducerModel(cfg)
    _load_state(model, state)
    model.tokenizer = tokenizer
    model.name = name or folder.name
    return model


def _load_state(model: TransducerModel, state: dict) -> None:
    try:
        model.load_state_dict(state, strict=True)
    except RuntimeError as e:
        raise ModelLoadError(f"checkpoint does not match the architecture its config describes:\n{e}") from None


def load_nemo(path: Path) -> TransducerModel:
    try:
        tar = tarfile.open(path, "r:*")
    except tarfile.TarError as e:
        raise ModelLoadError(f"{path} is not a .nemo archive: {e}") from None
    with tar, tempfile.TemporaryDirectory(prefix="trt_asr_nemo_") as tmp:
        for member in tar.getmembers():
            if not member.isfile():
                continue
            name = Path(member.name).name  # flatten ./ prefixes; never write outside tmp
            if name in ("model_config.yaml", "model_weights.ckpt") or name.endswith((".model", ".vocab", ".txt")):
                with tar.extractfile(member) as src, open(Path(tmp) / name, "wb") as dst:
                    dst.write(src.read())
        model = load_folder(Path(tmp), name=path.name.removesuffix(".nemo"))
        if model.tokenizer is not None:  # keep the tokenizer file alive past the temp dir
            CACHE_DIR.mkdir(parents=True, exist_ok=True)
            data = model.tokenizer.model_bytes
            keep = CACHE_DIR / f"tokenizer-{hashlib.sha256(data).hexdigest()[:16]}.model"
            if not keep.exists():
                keep.write_bytes(data)
            model.tokenizer = Tokenizer(keep)
    return model


def download_from_hub(repo_id: str) -> Path:
    try:
        from huggingface_hub import HfApi, hf_hub_download
    except ImportError:  # pragma: no cover - huggingface_hub is a core dependency
        raise ModelLoadError("huggingface_hub is not installed; cannot fetch " + repo_id) from None
    try:
        files = [f for f in HfApi().list_repo_files(repo_id) if f.endswith(".nemo")]
        if not files:
            raise ModelLoadError(f"Hugging Face repo {repo_id} has no .nemo file")
        return Path(hf_hub_download(repo_id, files[0]))
    except ModelLoadError:
        raise
    except Exception as e:  # offline, unknown repo, auth ...
        try:  # an earlier download may be in the local cache
            from huggingface_hub import try_to_load_from_cache
            for guess in (f"{repo_id.split('/')[-1]}.nemo",):
                cached = try_to_load_from_cache(repo_id, guess)
                if isinstance(cached, str):
                    return Path(cached)
        except Exception:
            pass
        raise ModelLoadError(f"could not download {repo_id} from the Hugging Face hub ({type(e).__name__}: {e}). "
                             f"Without network access, pass a local .nemo file with --model.") from None


# ----------------------------------------------------------------------------------------------- writing
def save_nemo(model: TransducerModel, path: str | Path, weights_dtype: str = "fp32") -> Path:
    """Write a .nemo archive (uncompressed tar, as NeMo writes): config, weights, tokenizer.

    ``weights_dtype="fp16"`` stores the trainable parameters in float16 (half the size; the shipped demo models use
    it to stay small in the repository); buffers (mel filterbank, window, BatchNorm statistics) stay float32. Loading
    (ours and NeMo's ``restore_from``) copies them into float32 parameters, so the loaded model is exactly the
    fp16-rounded one."""
    if weights_dtype not in ("fp32", "fp16"):
        raise ValueError(f"weights_dtype must be fp32 or fp16, not {weights_dtype!r}")
    path = Path(path)
    param_names = {n for n, _ in model.named_parameters()}
    store = torch.float16 if weights_dtype == "fp16" else torch.float32
    cfg = model.cfg.to_nemo_dict()
    files: dict[str, bytes] = {}
    if model.tokenizer is not None:
        tok_name = "tokenizer.model"
        files[tok_name] = model.tokenizer.model_bytes
        cfg["tokenizer"] = {**(cfg.get("tokenizer") or {}), "dir": None, "type": "bpe",
                            "model_path": f"nemo:{tok_name}"}
        vocab = "\n".join(model.tokenizer.piece(i) for i in range(model.tokenizer.vocab_size)) + "\n"
        files["vocab.txt"] = vocab.encode()
        cfg["tokenizer"]["vocab_path"] = "nemo:vocab.txt"
        # SentencePiece's own vocab file (piece<TAB>score): NeMo's BPE tokenizer setup reads it from
        # spe_tokenizer_vocab, and with dir=None it fails if the key is missing (NeMo writes all three files)
        sp = model.tokenizer.sp
        spe_vocab = "".join(f"{sp.id_to_piece(i)}\t{sp.get_score(i):g}\n" for i in range(model.tokenizer.vocab_size))
        files["tokenizer.vocab"] = spe_vocab.encode()
        cfg["tokenizer"]["spe_tokenizer_vocab"] = "nemo:tokenizer.vocab"
    buf = io.BytesIO()
    torch.save({k: v.detach().to("cpu", store if k in param_names else torch.float32) if v.is_floating_point()
                else v.cpu() for k, v in model.state_dict().items()}, buf)
    files["model_weights.ckpt"] = buf.getvalue()
    files["model_config.yaml"] = yaml.safe_dump(cfg, sort_keys=False).encode()
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(path.suffix + ".tmp")
    with tarfile.open(tmp, "w") as tar:
        for name in ("model_config.yaml", "model_weights.ckpt", *sorted(k for k in files if k not in
                                                                      ("model_config.yaml", "model_weights.ckpt"))):
            info = tarfile.TarInfo(f"./{name}")
            info.size = len(files[name])
            info.mtime = 0
            tar.addfile(info, io.BytesIO(files[name]))
    tmp.replace(path)
    return path


# ----------------------------------------------------------------------------------------------- random weights
def random_model(preset_spec: str, calibrate: bool = True) -> TransducerModel:
    """``random:<preset>[@seed]``: seeded random weights of a real config, calibrated so greedy decoding emits a
    realistic mix of blanks, labels and durations (see ``trt_asr.model.calibrate``)."""
    name, _, seed = preset_spec.partition("@")
    seed_value = int(seed) if seed else 0
    try:
        cfg = preset_config(name)
    except KeyError as e:
        raise ModelLoadError(str(e)) from None
    gen_state = torch.random.get_rng_state()
    torch.manual_seed(seed_value)
    try:
        model = TransducerModel(cfg)
        if calibrate:
            from .model.calibrate import calibrate_random_model
            calibrate_random_model(model, seed=seed_value)
    finally:
        torch.random.set_rng_state(gen_state)
    vocab = cfg.decoder.vocab_size
    tok = resources.files("trt_asr.assets").joinpath(f"random-bpe-{vocab}.model")
    model.tokenizer = Tokenizer(str(tok)) if tok.is_file() else None
    model.name = f"random:{preset_spec}"
    return model.eval()
