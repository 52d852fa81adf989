"""4D reconstruction: a point-cloud sequence -> one mesh per frame with shared faces (Motion2VecSets-style).

Data flow::

    points [T, N, 3] ──> shape diffusion (frame 0's points) ──> shape latent set ──> occupancy grid
        └─> deformation diffusion (all frames, the shape latent) ──> T deformation latent sets
    grid ──(marching cubes, once)──> reference mesh (V, F)
    each frame t: V + deformation decoder(latent_t, V) ──> vertices_t; the faces F are shared

Because every frame's mesh is the reference mesh moved vertex by vertex, vertex ``i`` corresponds
across all frames. Occupancy is queried in chunks on the models' device (the GPU when there is one).
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
import torch
from tqdm.auto import tqdm

from vgen.models.latent_diffusion import EDM, DenoiserConfig, LatentSetDenoiser
from vgen.models.vecset import DeformationVAE, ShapeVAE, VecSetConfig

__all__ = ["EmptySurfaceError", "Motion4DPipeline", "Reconstruction", "check_point_sequence", "render_strip"]

_BOX = 0.55  # occupancy is extracted in [-_BOX, _BOX]^3, the data's cube with a margin


class EmptySurfaceError(ValueError):
    """The predicted occupancy has no surface to extract (everything inside or everything outside)."""


def check_point_sequence(points: object, min_points: int = 1) -> np.ndarray:
    """float32 ``[T, N, 3]`` from an array or a list of per-frame arrays, or a ValueError naming the problem."""
    if isinstance(points, Sequence) and not isinstance(points, np.ndarray):
        frames = [np.asarray(p) for p in points]
        sizes = {f.shape for f in frames}
        if len(sizes) > 1:
            raise ValueError(f"every frame needs the same number of points, got shapes {sorted(sizes)}")
        points = np.stack(frames) if frames else np.zeros((0, 0, 3))
    array = np.asarray(points, dtype=np.float32)
    if array.ndim != 3 or array.shape[-1] != 3 or array.shape[0] < 1:
        raise ValueError(f"points must be [frames, points, 3], got shape {list(array.shape)}")
    if array.shape[1] < min_points:
        raise ValueError(f"each frame needs at least {min_points} points, got {array.shape[1]}")
    if not np.isfinite(array).all():
        raise ValueError("points hold NaN or infinite values")
    return array


@dataclass
class Reconstruction:
    """Meshes of every frame: ``vertices`` ``[T, V, 3]`` and the shared ``faces`` ``[F, 3]``."""

    vertices: np.ndarray
    faces: np.ndarray

    def save(self, folder: str | Path, file_format: str = "obj") -> list[Path]:
        """One ``frame_XXX.{obj,ply}`` per frame, written with trimesh."""
        import trimesh

        if file_format not in ("obj", "ply"):
            raise ValueError(f"file_format must be 'obj' or 'ply', got {file_format!r}")
        folder = Path(folder)
        folder.mkdir(parents=True, exist_ok=True)
        paths = []
        for t, vertices in enumerate(self.vertices):
            path = folder / f"frame_{t:03d}.{file_format}"
            trimesh.Trimesh(vertices, self.faces, process=False).export(path)
            paths.append(path)
        return paths


def render_strip(recon: Reconstruction, size: int = 192, max_frames: int = 8) -> np.ndarray:
    """uint8 ``[size, k * size, 3]``: up to ``max_frames`` frames side by side, flat-shaded, seen
    from a fixed oblique view (painter's algorithm with OpenCV)."""
    import cv2

    frames = np.linspace(0, len(recon.vertices) - 1, min(max_frames, len(recon.vertices))).round().astype(int)
    angle_y, angle_x = np.radians(35), np.radians(-25)
    rot_y = np.array([[np.cos(angle_y), 0, np.sin(angle_y)], [0, 1, 0], [-np.sin(angle_y), 0, np.cos(angle_y)]])
    rot_x = np.array([[1, 0, 0], [0, np.cos(angle_x), -np.sin(angle_x)], [0, np.sin(angle_x), np.cos(angle_x)]])
    view = rot_x @ rot_y
    light = np.array([0.3, 0.5, 0.8]) / np.linalg.norm([0.3, 0.5, 0.8])
    tiles = []
    for t in frames:
        image = np.full((size, size, 3), 245, np.uint8)
        v = recon.vertices[t] @ view.T
        tri = v[recon.faces]
        normals = np.cross(tri[:, 1] - tri[:, 0], tri[:, 2] - tri[:, 0])
        normals /= np.maximum(np.linalg.norm(normals, axis=1, keepdims=True), 1e-12)
        shade = np.clip(np.abs(normals @ light), 0.15, 1.0)
        order = np.argsort(tri[:, :, 2].mean(1))  # far to near
        pixels = ((tri[:, :, :2] * np.array([1, -1]) / (2 * _BOX) + 0.5) * (size - 1)).round().astype(np.int32)
        for f in order:
            colour = (np.array([90, 140, 220]) * shade[f]).astype(int).tolist()
            cv2.fillConvexPoly(image, pixels[f], colour, lineType=cv2.LINE_AA)
        tiles.append(image)
    return np.concatenate(tiles, 1)


@dataclass(frozen=True)
class Motion4DConfig:
    shape: VecSetConfig
    deform: VecSetConfig
    shape_denoiser: DenoiserConfig
    deform_denoiser: DenoiserConfig
    edm_sigma_data: float = 1.0
    shape_latent_std: float = 1.0  # the diffusion models see latents divided by these
    deform_latent_std: float = 1.0


class Motion4DPipeline:
    """The four networks of a 4D reconstruction model; see the module docstring."""

    def __init__(self, config: Motion4DConfig, device: str | torch.device = "cpu") -> None:
        self.config = config
        self.shape_vae = ShapeVAE(config.shape)
        self.deform_vae = DeformationVAE(config.deform)
        self.shape_denoiser = LatentSetDenoiser(config.shape_denoiser)
        self.deform_denoiser = LatentSetDenoiser(config.deform_denoiser)
        self.edm = EDM(sigma_data=config.edm_sigma_data)
        self.to(device)

    def modules(self) -> dict[str, torch.nn.Module]:
        return {"shape_vae": self.shape_vae, "deform_vae": self.deform_vae, "shape_denoiser": self.shape_denoiser,
                "deform_denoiser": self.deform_denoiser}  # fmt: skip

    def to(self, device: str | torch.device) -> Motion4DPipeline:
        self.device = torch.device(device)
        for module in self.modules().values():
            module.to(self.device).eval()
        return self

    def save_pretrained(self, folder: str | Path, dtype: torch.dtype = torch.float32) -> Path:
        """``config.json`` and one safetensors file per network, weights in ``dtype`` (loading casts back)."""
        from safetensors.torch import save_file

        folder = Path(folder)
        folder.mkdir(parents=True, exist_ok=True)
        (folder / "config.json").write_text(json.dumps(asdict(self.config), indent=1))
        for name, module in self.modules().items():
            weights = {k: v.detach().to("cpu", dtype if v.is_floating_point() else v.dtype).contiguous()
                       for k, v in module.state_dict().items()}  # fmt: skip
            save_file(weights, folder / f"{name}.safetensors")
        return folder

    @classmethod
    def from_pretrained(cls, folder: str | Path, device: str | torch.device | None = None) -> Motion4DPipeline:
        from safetensors.torch import load_file

        folder = Path(folder)
        if not (folder / "config.json").exists():
            raise FileNotFoundError(f"{folder} holds no Motion4D model (config.json missing)")
        raw = json.loads((folder / "config.json").read_text())
        config = Motion4DConfig(
            shape=VecSetConfig(**raw["shape"]), deform=VecSetConfig(**raw["deform"]),
            shape_denoiser=DenoiserConfig(**raw["shape_denoiser"]),
            deform_denoiser=DenoiserConfig(**raw["deform_denoiser"]), edm_sigma_data=raw["edm_sigma_data"],
            shape_latent_std=raw.get("shape_latent_std", 1.0), deform_latent_std=raw.get("deform_latent_std", 1.0),
        )  # fmt: skip
        pipe = cls(config, "cpu")
        for name, module in pipe.modules().items():
            module.load_state_dict(load_file(folder / f"{name}.safetensors"))
        return pipe.to(device or ("cuda" if torch.cuda.is_available() else "cpu"))

    @torch.no_grad()
    def occupancy_grid(self, shape_latent: torch.Tensor, resolution: int, chunk: int = 65536) -> np.ndarray:
        """Occupancy logits on a ``resolution^3`` grid over the cube, queried in chunks on the device."""
        axis = torch.linspace(-_BOX, _BOX, resolution, device=self.device)
        grid = torch.stack(torch.meshgrid(axis, axis, axis, indexing="ij"), -1).view(1, -1, 3)
        logits = torch.cat([self.shape_vae.decode(shape_latent, grid[:, i : i + chunk])[..., 0]
                            for i in range(0, grid.shape[1], chunk)], 1)  # fmt: skip
        return logits.view(resolution, resolution, resolution).float().cpu().numpy()

    @torch.no_grad()
    def __call__(
        self,
        points: np.ndarray | Sequence[np.ndarray],
        *,
        steps: int = 18,
        resolution: int = 64,
        seed: int = 0,
        progress: bool = True,
    ) -> Reconstruction:
        """Meshes of every frame of ``points`` (``[T, N, 3]`` in the data's [-0.5, 0.5] cube)."""
        tokens = max(self.config.shape_denoiser.point_tokens, self.config.deform_denoiser.point_tokens)
        array = check_point_sequence(points, min_points=tokens)
        if not isinstance(resolution, int) or resolution < 8:
            raise ValueError(f"resolution must be an int >= 8, got {resolution!r}")
        frames = len(array)
        x = torch.from_numpy(array).to(self.device)[None]  # [1, T, N, 3]
        generator = torch.Generator(self.device).manual_seed(seed)
        bar = tqdm(total=2 * steps + frames + 1, desc="reconstruct", disable=not progress)
        tick = lambda _: bar.update(1)  # noqa: E731
        s, d = self.config.shape, self.config.deform
        shape_latent = self.edm.sample(
            self.shape_denoiser, (1, 1, s.num_latents, s.latent_dim), steps=steps, generator=generator,
            device=self.device, progress=tick, points=x[:, :1],
        )[:, 0]  # fmt: skip
        deform = self.edm.sample(self.deform_denoiser, (1, frames, d.num_latents, d.latent_dim), steps=steps,
                                 generator=generator, device=self.device, progress=tick, points=x,
                                 shape=shape_latent)  # fmt: skip
        c = self.config
        deform = deform * c.deform_latent_std
        grid = self.occupancy_grid(shape_latent * c.shape_latent_std, resolution)
        bar.update(1)
        vertices, faces = _marching_cubes(grid, resolution)
        reference = torch.from_numpy(vertices).to(self.device)[None]
        moved = []
        for t in range(frames):
            offsets = self.deform_vae.decode(deform[:, t], reference)[0] if t else torch.zeros_like(reference[0])
            moved.append((reference[0] + offsets).cpu().numpy())
            bar.update(1)
        bar.close()
        return Reconstruction(np.stack(moved).astype(np.float32), faces)


def _marching_cubes(logits: np.ndarray, resolution: int) -> tuple[np.ndarray, np.ndarray]:
    """Vertices in cube coordinates and outward-wound faces of the logit-0 level set (an empty grid: a
    ValueError)."""
    from skimage.measure import marching_cubes

    if logits.max() <= 0 or logits.min() >= 0:
        raise EmptySurfaceError("the predicted occupancy has no surface (everything inside or everything outside)")
    vertices, faces, _, _ = marching_cubes(logits, level=0.0)
    vertices = vertices / (resolution - 1) * (2 * _BOX) - _BOX
    # skimage winds the triangles of a field that is high inside clockwise seen from outside (normals in);
    # reversed, the normals point out, as renderers and winding numbers expect.
    return vertices.astype(np.float32), np.ascontiguousarray(faces[:, ::-1]).astype(np.int64)
