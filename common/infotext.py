"""A1111-style generation parameters text ("infotext").

Why: tools in the SD ecosystem (A1111's PNG Info, ComfyUI, civitai) read the
`parameters` text chunk of a PNG to reproduce an image; every image sdqueue
writes carries one, in the same shape.
"""
from __future__ import annotations

from common.jobspec import JobSpec

VERSION = "sdqueue 0.1"
SCHEDULE_LABELS = (("use_karras_sigmas", "Karras"), ("use_exponential_sigmas", "Exponential"),
                   ("use_beta_sigmas", "Beta"))   # scheduler option -> A1111's "Schedule type"


def build_infotext(spec: JobSpec, seed: int, width: int, height: int, sampler: str | None = None,
                   version: str = "") -> str:
    """Prompt, negative prompt, then one `Key: value, ...` line, as A1111 writes it.

    A hires fix image's Size is its first pass's, as the web UI writes it
    (its Hires upscale or Hires resize gives the rest), so pasting the text
    back into the web UI makes the same request.
    """
    if spec.extras:     # an extras upscale: the web UI writes its postprocessing entries alone
        from common.extras import extras_info, infotext_line

        return infotext_line(extras_info(spec.extras))
    if spec.hires:
        width, height = spec.width, spec.height
    params = {
        "Steps": spec.num_inference_steps,
        "Sampler": spec.sampler_name or sampler or spec.scheduler or "default",
        "CFG scale": spec.guidance_scale,
        "Seed": seed,
        "Size": f"{width}x{height}",
        "Model": spec.model,
    }
    schedule = next((label for option, label in SCHEDULE_LABELS if spec.scheduler_config.get(option)), None)
    if schedule:
        params["Schedule type"] = schedule
    if spec.init_image_key and spec.strength is not None:
        params["Denoising strength"] = spec.strength
    if spec.hires:
        params.update(hires_params(spec))
    if spec.refiner:
        params["Refiner"] = spec.refiner
        params["Refiner switch at"] = spec.refiner_switch
    if spec.loras:
        params["Lora weights"] = ", ".join(f"{lr.name}: {lr.weight:g}" for lr in spec.loras)
    if version:
        params["Version"] = version
    line = ", ".join(f"{k}: {_quote(str(v))}" for k, v in params.items())
    text = spec.prompt
    if spec.negative_prompt:
        text += f"\nNegative prompt: {spec.negative_prompt}"
    return f"{text}\n{line}"


def hires_params(spec: JobSpec) -> dict[str, object]:
    """The web UI's infotext entries of a hires fix (StableDiffusionProcessingTxt2Img.init), in its order."""
    hires = spec.hires or {}
    params: dict[str, object] = {"Denoising strength": hires.get("strength")}
    if hires.get("resize"):
        params["Hires resize"] = hires["resize"]
    else:
        params["Hires upscale"] = hires.get("scale")
    if hires.get("steps"):
        params["Hires steps"] = hires["steps"]
    params["Hires upscaler"] = hires.get("upscaler")
    for key, label in (("sampler_name", "Hires sampler"), ("schedule", "Hires schedule type"),
                       ("prompt", "Hires prompt"), ("negative_prompt", "Hires negative prompt")):
        if hires.get(key):
            params[label] = hires[key]
    return params


def generation_info(spec: JobSpec, seeds: list[int]) -> dict:
    """The generation facts of a finished job in A1111's `info` names (shared by the dialects that report them)."""
    negative = spec.negative_prompt or ""
    return {
        "prompt": spec.prompt, "all_prompts": [spec.prompt] * len(seeds),
        "negative_prompt": negative, "all_negative_prompts": [negative] * len(seeds),
        "seed": spec.seed, "all_seeds": seeds, "width": spec.width, "height": spec.height,
        "sampler_name": spec.sampler_name, "cfg_scale": spec.guidance_scale, "steps": spec.num_inference_steps,
        "batch_size": spec.batch_size or len(seeds), "denoising_strength": spec.strength if spec.strength is not None else (spec.hires or {}).get("strength"),
        "infotexts": [build_infotext(spec, s, spec.width, spec.height, version=VERSION) for s in seeds],
        "version": VERSION,
    }


def _quote(value: str) -> str:
    """Quote a value containing separators, as A1111's infotext writer does."""
    if "," not in value and ":" not in value and "\n" not in value:
        return value
    return '"' + value.replace("\\", "\\\\").replace('"', '\\"') + '"'


def parse_infotext(text: str) -> dict[str, str]:
    """The inverse, enough for tests and png-info: prompt, negative prompt, params."""
    lines = text.strip().split("\n")
    params_line = lines[-1] if len(lines) > 1 else ""
    body = lines[:-1]
    out: dict[str, str] = {}
    neg = [i for i, ln in enumerate(body) if ln.startswith("Negative prompt: ")]
    if neg:
        out["prompt"] = "\n".join(body[:neg[0]])
        out["negative_prompt"] = "\n".join(body[neg[0]:])[len("Negative prompt: "):]
    else:
        out["prompt"] = "\n".join(body)
    for part in _split_params(params_line):
        if ": " in part:
            key, value = part.split(": ", 1)
            out[key.strip()] = value.strip().strip('"')
    return out


def _split_params(line: str) -> list[str]:
    parts, buf, quoted = [], "", False
    for ch in line:
        if ch == '"':
            quoted = not quoted
        if ch == "," and not quoted:
            parts.append(buf)
            buf = ""
            continue
        buf += ch
    if buf:
        parts.append(buf)
    return parts
