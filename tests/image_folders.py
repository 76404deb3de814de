"""Small folders of flat-coloured, noisy PNGs: one class per colour, for end-to-end runs."""
from pathlib import Path

import torch


def write_image_folder(root: Path, colours, per_class: int, train: int, *, valid: str = "valid",
                       prefix: str = "class", size=(48, 48), noise: int = 40, seed: int = 0) -> Path:
    """root/train/<prefix><c>/<i>.png for the first ``train`` images of each class, root/<valid>/... for the rest."""
    from PIL import Image

    g = torch.Generator().manual_seed(seed)
    for c, colour in enumerate(colours):
        for i in range(per_class):
            folder = root / ("train" if i < train else valid) / f"{prefix}{c}"
            folder.mkdir(parents=True, exist_ok=True)
            pixels = torch.randint(0, noise, (*size, 3), generator=g, dtype=torch.uint8)
            Image.fromarray((torch.tensor(colour, dtype=torch.uint8) + pixels).numpy()).save(folder / f"{i}.png")
    return root
