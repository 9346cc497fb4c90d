"""`rlgen sample` on a diffusers pipeline: PNG files plus a JSONL index (one line per image), optionally a
grid; the same sampler code the image trainers use."""
from __future__ import annotations

import os
import shutil
from pathlib import Path

from rlgen.errors import RlgenError


def image_dir_for(out: str, image_dir: str | None) -> tuple[Path, Path]:
    """(directory for the PNGs, directory their paths in the JSONL are relative to)."""
    base = Path(out).resolve().parent if out != "-" else Path.cwd()
    if image_dir:
        return Path(image_dir).resolve(), base
    return (base / f"{Path(out).stem}_images" if out != "-" else base / "rlgen_images"), base


def sample_images_cli(*, model: str, records: list[dict], n: int, sampler: str, sampler_opt, sampler_reward,
                      num_steps: int, guidance_scale: float, eta: float, seed: int, batch_size: int, out: str,
                      image_dir: str | None, grid: str | None, reporter) -> None:
    import torch

    from rlgen.data.records import write_records
    from rlgen.diffusion.images import save_grid, save_png
    from rlgen.diffusion.pipeline import DiffusionModelConfig, load_diffusion_model
    from rlgen.diffusion.sampling import DiffusionSamplingParams
    from rlgen.rollout.samplers import call_sampler, prepare_sampler

    if batch_size < 1:
        raise RlgenError("--batch-size must be >= 1")
    strategy, options, guide = prepare_sampler(sampler, sampler_opt, sampler_reward, kind="image-sampler")
    params = DiffusionSamplingParams(num_steps, guidance_scale, eta, eta)
    params.validate()
    folder, relative_to = image_dir_for(out, image_dir)
    if folder.exists() and any(folder.iterdir()):
        raise RlgenError(f"image directory {folder} already exists and is not empty (choose another with --image-dir)")
    diffusion = load_diffusion_model(DiffusionModelConfig(path=model))
    diffusion.eval()
    diffusion.check_prompts(records)
    generator = torch.Generator().manual_seed(seed)
    expanded = [{**r, "sample_index": i} for r in records for i in range(n)]
    tmp = folder.with_name(f".{folder.name}.tmp")
    if tmp.exists():
        shutil.rmtree(tmp)
    tmp.mkdir(parents=True)
    results, images, stats = [], [], {}
    try:
        with reporter.progress(total=len(expanded), description="sampling images") as advance:
            for start in range(0, len(expanded), batch_size):
                part = expanded[start : start + batch_size]
                with torch.enable_grad() if sampler == "reno" else torch.no_grad():
                    drawn = call_sampler(strategy, diffusion, [str(r["prompt"]) for r in part], params, generator,
                                         rewards=guide, records=part, stats=stats, options=options)
                for k, s in enumerate(drawn):
                    name = f"{start + k:06d}.png"
                    save_png(s["image"], tmp / name)
                    images.append(s["image"])
                    record = {key: value for key, value in s.items() if key != "image"}
                    results.append({**record, "image": os.path.relpath(folder / name, relative_to)})
                for _ in part:
                    advance()
        if folder.exists():
            folder.rmdir()
        os.replace(tmp, folder)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    if stats:
        reporter.log(f"{sampler}: " + ", ".join(f"{key}={value}" for key, value in sorted(stats.items())))
    if grid:
        save_grid(torch.stack(images), grid, nrow=n if n > 1 else min(10, len(images)))
        reporter.log(f"grid written to {grid}")
    reporter.log(f"{len(results)} images written to {folder}")
    write_records(results, out)
