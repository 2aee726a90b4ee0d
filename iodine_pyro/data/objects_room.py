"""Procedural Objects Room (Burgess et al. 2019), single frames and 16-frame camera flights.

Rendered with MuJoCo (PyPI ``mujoco``, the engine the original was made with) headless
through EGL (``MUJOCO_GL=egl``, the default set here) or OSMesa (``MUJOCO_GL=osmesa``).
MuJoCo is imported only when a chunk is generated; it is part of the optional ``render``
extra (``pip install -e ".[render]"`` in a clone).

The scene, following the paper's appendix B.5 (the original generator is not public):

* a cubic room: a square floor of side ``2 * ROOM_HALF`` and four walls of height
  ``WALL_HEIGHT``, open to a sky (a blue gradient) above; the floor and each half of the
  walls get a random colour;
* 3 objects, each one of 5 shapes (box, sphere, cylinder, capsule, ellipsoid) with a random
  size, colour and rotation about the vertical, resting on the floor at random positions
  in a disc of radius ``OBJECT_RADIUS`` without touching each other;
* a camera on a ring of radius ``CAMERA_RING`` at height ``CAMERA_HEIGHT``, facing the
  room's centre, pitched within (-25, 22) degrees (negative looks down), vertical field of
  view ``FOVY`` degrees;
* 1 to 3 objects visible (at least one pixel each) in every frame: a camera (or camera
  flight) with no object in view is redrawn, and after ``CAMERA_TRIES`` failures the scene.

Masks: 7 groups, as the official layout: 0 sky, 1 floor, 2 and 3 the two wall halves
(walls on the +x and +y sides, walls on the -x and -y sides), 4..6 the objects. Which walls
the official data groups together is not documented; this split is an assumption. A
foreground-only score (FG-ARI) should drop all four background groups, not just group 0.

Factors per group (zeros where a factor does not apply): ``x``, ``y``, ``z`` (object
centre, metres, room centre at the origin, z up), ``size`` (the object's scale ``s``:
e.g. a box of half-side ``s``), ``orientation`` (rotation about z, radians), ``shape``
(0 sky/floor/wall, 1..5 = :data:`SHAPES`), ``color`` (RGB in [0, 1] of every group, sky
included: the horizon colour) and ``visibility`` (1 where the group has at least one pixel;
in sequences: in at least one frame). Sequences add ``frame_visibility`` [group, frame].

Sequences (appendix A.1/B.5): 16 frames of a static scene; the camera's ring angle and pitch
change at a constant velocity drawn per sequence: the ring angle by up to
``MAX_RING_SPEED`` degrees a frame, the pitch linearly between two uniform draws within
(-25, 22) degrees.

Images are identical for identical seeds on one machine and OpenGL driver; other drivers
may differ in the last bits of antialiased edges.
"""

from __future__ import annotations

import colorsys
import os
from dataclasses import dataclass

import numpy as np

from .errors import DatasetError
from .spec import RENDER_HINT, DatasetSpec

__all__ = [
    "IMAGE_SIZE",
    "NUM_OBJECTS",
    "NUM_GROUPS",
    "NUM_FRAMES",
    "SHAPES",
    "PITCH_RANGE",
    "make_chunk",
    "make_sequence_chunk",
]

IMAGE_SIZE = 64
NUM_OBJECTS = 3
NUM_BACKGROUND = 4  # sky, floor, two wall halves
NUM_GROUPS = NUM_BACKGROUND + NUM_OBJECTS
NUM_FRAMES = 16
SHAPES = ("box", "sphere", "cylinder", "capsule", "ellipsoid")  # shape factor 1..5

ROOM_HALF = 3.0  # metres from the centre to each wall
WALL_HEIGHT = 1.5
CAMERA_RING = 2.4
CAMERA_HEIGHT = 0.8
FOVY = 50.0  # degrees
PITCH_RANGE = (-25.0, 22.0)  # degrees; negative looks down
MAX_RING_SPEED = 5.0  # degrees per frame
OBJECT_RADIUS = 1.8  # object centres lie within this distance of the room centre
SIZE_RANGE = (0.25, 0.45)
GAP = 0.1  # minimum clearance between object footprints
CAMERA_TRIES = 20
SKY = ((0.6, 0.8, 1.0), (0.3, 0.5, 0.8))  # skybox gradient: horizon, zenith

# Half-extents (MuJoCo geom size) per unit scale, resting height and footprint radius.
_GEOM_SIZE = {
    "box": (1.0, 1.0, 1.0),
    "sphere": (1.0, 0.0, 0.0),
    "cylinder": (1.0, 1.0, 0.0),  # radius, half-height
    "capsule": (0.6, 0.6, 0.0),  # radius, half-length of the segment
    "ellipsoid": (1.2, 0.8, 0.7),
}
_HALF_HEIGHT = {"box": 1.0, "sphere": 1.0, "cylinder": 1.0, "capsule": 1.2, "ellipsoid": 0.7}
_FOOTPRINT = {"box": np.sqrt(2.0), "sphere": 1.0, "cylinder": 1.0, "capsule": 0.6, "ellipsoid": 1.2}

_VISIBLE_GROUP, _HIDDEN_GROUP = 0, 3  # MuJoCo geom groups shown / hidden by default


def _mujoco():
    """Import MuJoCo with a headless OpenGL backend, or explain how to install it."""
    os.environ.setdefault("MUJOCO_GL", "egl")
    try:                      # the optional render extra, imported only to render (and after MUJOCO_GL)
        import mujoco
    except ImportError as err:
        if getattr(err, "name", None) == "mujoco":
            raise DatasetError(f"Objects Room needs MuJoCo: {RENDER_HINT}") from err
        raise DatasetError(_gl_hint(err)) from err
    except Exception as err:  # MuJoCo loads its OpenGL backend on import
        raise DatasetError(_gl_hint(err)) from err
    return mujoco


def _gl_hint(err: BaseException) -> str:
    text = str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
    return (f"MuJoCo cannot render headless with MUJOCO_GL={os.environ.get('MUJOCO_GL')!r} ({text}); "
            f"install Debian's libegl1 and libegl-mesa0 for egl, or libosmesa6 and set MUJOCO_GL=osmesa")


def _xml() -> str:
    """The room with every object slot holding one (hidden) geom per shape."""
    h, half = WALL_HEIGHT / 2, ROOM_HALF
    walls = {  # name: (position, half-extents)
        "wall_xp": ((half, 0, h), (0.01, half, h)),
        "wall_yp": ((0, half, h), (half, 0.01, h)),
        "wall_xn": ((-half, 0, h), (0.01, half, h)),
        "wall_yn": ((0, -half, h), (half, 0.01, h)),
    }
    wall_xml = "".join(
        f'<geom name="{name}" type="box" pos="{p[0]} {p[1]} {p[2]}" size="{s[0]} {s[1]} {s[2]}"/>'
        for name, (p, s) in walls.items()
    )
    objects_xml = "".join(  # one mocap body per object, posed through MjData.mocap_pos/quat
        f'<body name="obj{k}" mocap="true">'
        + "".join(f'<geom name="obj{k}_{shape}" type="{shape}" size="0.3 0.3 0.3" group="{_HIDDEN_GROUP}"/>'
                  for shape in SHAPES)
        + "</body>"
        for k in range(NUM_OBJECTS)
    )
    (r1, g1, b1), (r2, g2, b2) = SKY
    return f"""
<mujoco>
  <visual>
    <headlight ambient="0.4 0.4 0.4" diffuse="0.5 0.5 0.5" specular="0 0 0"/>
    <quality shadowsize="1024" offsamples="4"/>
    <global fovy="{FOVY}"/>
  </visual>
  <asset>
    <texture type="skybox" builtin="gradient" rgb1="{r1} {g1} {b1}" rgb2="{r2} {g2} {b2}" width="64" height="64"/>
  </asset>
  <worldbody>
    <light pos="0.5 -0.5 4" dir="0 0 -1" diffuse="0.5 0.5 0.5" castshadow="true"/>
    <geom name="floor" type="plane" size="{half} {half} 0.1"/>
    {wall_xml}
    {objects_xml}
  </worldbody>
</mujoco>"""


def _hsv(rng: np.random.Generator, saturation: tuple[float, float], value: tuple[float, float]) -> np.ndarray:
    """A colour of uniform hue with saturation and value uniform in the given ranges."""
    hue = rng.uniform()
    return np.array(colorsys.hsv_to_rgb(hue, rng.uniform(*saturation), rng.uniform(*value)))  # [3]


@dataclass
class _Scene:
    shape: np.ndarray  # [3] index into SHAPES
    size: np.ndarray  # [3]
    position: np.ndarray  # [3, 3] centre x, y, z
    orientation: np.ndarray  # [3] radians about z
    color: np.ndarray  # [7, 3] per group


def _draw_scene(rng: np.random.Generator) -> _Scene:
    """Room colours and 3 non-touching objects on the floor."""
    while True:
        shape = rng.integers(0, len(SHAPES), size=NUM_OBJECTS)  # [3]
        size = rng.uniform(*SIZE_RANGE, size=NUM_OBJECTS)  # [3]
        radius = OBJECT_RADIUS * np.sqrt(rng.uniform(size=NUM_OBJECTS))  # [3] uniform in the disc
        angle = rng.uniform(0, 2 * np.pi, size=NUM_OBJECTS)  # [3]
        xy = np.stack([radius * np.cos(angle), radius * np.sin(angle)], axis=1)  # [3, 2]
        footprint = size * np.array([_FOOTPRINT[SHAPES[s]] for s in shape])  # [3]
        distance = np.linalg.norm(xy[:, None] - xy[None], axis=-1)  # [3, 3]
        clearance = distance - footprint[:, None] - footprint[None]  # [3, 3]
        if (clearance[np.triu_indices(NUM_OBJECTS, 1)] >= GAP).all():
            break
    z = size * np.array([_HALF_HEIGHT[SHAPES[s]] for s in shape])  # [3]
    color = np.zeros((NUM_GROUPS, 3))  # [7, 3]
    color[0] = SKY[0]
    color[1] = _hsv(rng, (0.2, 0.7), (0.4, 0.8))  # floor
    color[2] = _hsv(rng, (0.3, 0.9), (0.4, 0.9))  # walls +x, +y
    color[3] = _hsv(rng, (0.3, 0.9), (0.4, 0.9))  # walls -x, -y
    for k in range(NUM_OBJECTS):
        color[NUM_BACKGROUND + k] = _hsv(rng, (0.6, 1.0), (0.6, 1.0))
    return _Scene(shape=shape, size=size, position=np.concatenate([xy, z[:, None]], axis=1),
                  orientation=rng.uniform(0, 2 * np.pi, size=NUM_OBJECTS), color=color)


class _Room:
    """One MuJoCo model and renderer, reused for every scene of a chunk."""

    def __init__(self):
        mujoco = self.mujoco = _mujoco()
        self.model = mujoco.MjModel.from_xml_string(_xml())
        self.data = mujoco.MjData(self.model)
        try:
            self.renderer = mujoco.Renderer(self.model, IMAGE_SIZE, IMAGE_SIZE)
        except Exception as err:  # no OpenGL context: EGL or OSMesa missing
            raise DatasetError(_gl_hint(err)) from err
        def geom(name: str) -> int:
            return mujoco.mj_name2id(self.model, mujoco.mjtObj.mjOBJ_GEOM, name)

        self.slot_geoms = np.array([[geom(f"obj{k}_{s}") for s in SHAPES] for k in range(NUM_OBJECTS)])  # [3, 5]
        self.floor = geom("floor")
        self.walls = (geom("wall_xp"), geom("wall_yp")), (geom("wall_xn"), geom("wall_yn"))
        # segmentation id + 1 (so that -1, no geom, is index 0) -> mask group
        self.group_of = np.zeros(self.model.ngeom + 1, dtype=np.int64)  # [ngeom + 1]; 0 = sky
        self.group_of[self.floor + 1] = 1
        for half, ids in enumerate(self.walls):
            self.group_of[np.array(ids) + 1] = 2 + half
        self.camera = mujoco.MjvCamera()

    def close(self) -> None:
        self.renderer.close()

    def set_scene(self, scene: _Scene) -> None:
        m = self.model
        m.geom_rgba[self.floor, :3] = scene.color[1]
        for half, ids in enumerate(self.walls):
            m.geom_rgba[list(ids), :3] = scene.color[2 + half]
        m.geom_group[self.slot_geoms.ravel()] = _HIDDEN_GROUP
        self.group_of[self.slot_geoms.ravel() + 1] = 0
        for k in range(NUM_OBJECTS):
            name = SHAPES[scene.shape[k]]
            g = self.slot_geoms[k, scene.shape[k]]
            m.geom_group[g] = _VISIBLE_GROUP
            m.geom_size[g] = scene.size[k] * np.array(_GEOM_SIZE[name])
            half_turn = scene.orientation[k] / 2
            self.data.mocap_pos[k] = scene.position[k]
            self.data.mocap_quat[k] = [np.cos(half_turn), 0.0, 0.0, np.sin(half_turn)]
            m.geom_rgba[g] = [*scene.color[NUM_BACKGROUND + k], 1.0]
            self.group_of[g + 1] = NUM_BACKGROUND + k
        self.mujoco.mj_kinematics(m, self.data)

    def _aim(self, ring_angle: float, pitch: float) -> None:
        """Camera on the ring at ``ring_angle`` (radians), facing the centre, ``pitch`` degrees."""
        position = np.array([CAMERA_RING * np.cos(ring_angle), CAMERA_RING * np.sin(ring_angle), CAMERA_HEIGHT])
        azimuth = ring_angle + np.pi  # towards the centre
        elevation = np.deg2rad(pitch)
        forward = np.array([np.cos(elevation) * np.cos(azimuth), np.cos(elevation) * np.sin(azimuth),
                            np.sin(elevation)])  # [3]
        self.camera.lookat[:] = position + forward  # the free camera sits 1 m behind its look-at point
        self.camera.distance = 1.0
        self.camera.azimuth = np.rad2deg(azimuth)
        self.camera.elevation = pitch

    def labels(self, ring_angle: float, pitch: float) -> np.ndarray:
        """Mask group of every pixel, [64, 64] int64."""
        self._aim(ring_angle, pitch)
        self.renderer.enable_segmentation_rendering()
        self.renderer.update_scene(self.data, self.camera)
        ids = self.renderer.render()[..., 0]  # [64, 64] geom id, -1 where nothing is hit
        return self.group_of[ids.astype(np.int64) + 1]  # [64, 64]

    def image(self, ring_angle: float, pitch: float) -> np.ndarray:
        """RGB image, [64, 64, 3] uint8."""
        self._aim(ring_angle, pitch)
        self.renderer.disable_segmentation_rendering()
        self.renderer.update_scene(self.data, self.camera)
        return self.renderer.render().copy()  # [64, 64, 3] uint8


def _objects_in_view(labels: np.ndarray) -> int:
    """Number of objects with at least one pixel in a [..., 64, 64] label map."""
    present = np.isin(np.arange(NUM_BACKGROUND, NUM_GROUPS), labels)  # [3]
    return int(present.sum())


def _camera_path(rng: np.random.Generator, frames: int) -> tuple[np.ndarray, np.ndarray]:
    """Ring angles (radians) and pitches (degrees) of a flight at constant velocity."""
    start = rng.uniform(0, 2 * np.pi)
    speed = np.deg2rad(rng.uniform(-MAX_RING_SPEED, MAX_RING_SPEED))
    pitch_first, pitch_last = rng.uniform(*PITCH_RANGE, size=2)
    t = np.arange(frames)  # [F]
    ring = start + speed * t  # [F]
    pitch = pitch_first + (pitch_last - pitch_first) * t / max(frames - 1, 1)  # [F]
    return ring, pitch


def _render_scenes(rng: np.random.Generator, n: int, frames: int) -> dict[str, np.ndarray]:
    """n scenes of ``frames`` frames each, every frame with 1 to 3 objects in view."""
    room = _Room()
    images = np.zeros((n, frames, IMAGE_SIZE, IMAGE_SIZE, 3), dtype=np.uint8)  # [n, F, 64, 64, 3]
    labels = np.zeros((n, frames, IMAGE_SIZE, IMAGE_SIZE), dtype=np.int64)  # [n, F, 64, 64]
    scenes: list[_Scene] = []
    try:
        for i in range(n):
            while True:  # redraw the scene when no camera path keeps an object in view
                scene = _draw_scene(rng)
                room.set_scene(scene)
                path = _accepted_path(room, rng, frames)
                if path is not None:
                    break
            ring, pitch, labels[i] = path
            images[i] = [room.image(a, p) for a, p in zip(ring, pitch)]
            scenes.append(scene)
    finally:
        room.close()
    return _arrays(scenes, images, labels)


def _accepted_path(room: _Room, rng: np.random.Generator, frames: int):
    """A camera path whose every frame shows 1 to 3 objects, or None after CAMERA_TRIES."""
    for _ in range(CAMERA_TRIES):
        ring, pitch = _camera_path(rng, frames)
        labels = np.zeros((frames, IMAGE_SIZE, IMAGE_SIZE), dtype=np.int64)  # [F, 64, 64]
        for f in range(frames):
            labels[f] = room.labels(ring[f], pitch[f])
            if _objects_in_view(labels[f]) == 0:
                break
        else:
            return ring, pitch, labels
    return None


def _arrays(scenes: list[_Scene], images: np.ndarray, labels: np.ndarray) -> dict[str, np.ndarray]:
    n = len(labels)
    groups = np.arange(NUM_GROUPS)
    mask = (labels[:, :, None] == groups[None, None, :, None, None]).astype(np.uint8)  # [n, F, 7, 64, 64]
    frame_visibility = mask.any(axis=(3, 4)).transpose(0, 2, 1).astype(np.float32)  # [n, 7, F]

    def per_object(values: np.ndarray) -> np.ndarray:  # background groups get zeros
        out = np.zeros((n, NUM_GROUPS), dtype=np.float32)  # [n, 7]
        out[:, NUM_BACKGROUND:] = values
        return out

    position = np.stack([s.position for s in scenes])  # [n, 3, 3]
    return {
        "image": images,  # [n, F, 64, 64, 3] uint8
        "mask": mask,  # [n, F, 7, 64, 64] uint8 0/1
        "x": per_object(position[..., 0]),  # [n, 7]
        "y": per_object(position[..., 1]),  # [n, 7]
        "z": per_object(position[..., 2]),  # [n, 7]
        "size": per_object(np.stack([s.size for s in scenes])),  # [n, 7]
        "orientation": per_object(np.stack([s.orientation for s in scenes])),  # [n, 7]
        "shape": per_object(np.stack([s.shape for s in scenes]) + 1),  # [n, 7] 1..5, 0 background
        "color": np.stack([s.color for s in scenes]).astype(np.float32),  # [n, 7, 3]
        "visibility": frame_visibility.max(axis=2),  # [n, 7]
        "frame_visibility": frame_visibility,  # [n, 7, F]
    }


def make_chunk(rng: np.random.Generator, n: int) -> dict[str, np.ndarray]:
    """Generate ``n`` single Objects Room frames with masks and factors.

    Returns numpy arrays: ``image`` [n, 64, 64, 3] uint8, ``mask`` [n, 7, 64, 64] uint8 0/1,
    ``x``, ``y``, ``z``, ``size``, ``orientation``, ``shape``, ``visibility`` [n, 7] float32
    and ``color`` [n, 7, 3] float32.

    Raises:
        DatasetError: when MuJoCo is not installed or cannot render headless.
    """
    arrays = _render_scenes(rng, n, frames=1)
    arrays.pop("frame_visibility")
    arrays["image"] = arrays["image"][:, 0]  # [n, 64, 64, 3]
    arrays["mask"] = arrays["mask"][:, 0]  # [n, 7, 64, 64]
    return arrays


def make_sequence_chunk(rng: np.random.Generator, n: int) -> dict[str, np.ndarray]:
    """Generate ``n`` 16-frame camera flights through Objects Room scenes.

    Returns numpy arrays: ``image`` [n, 16, 64, 64, 3] uint8, ``mask`` [n, 16, 7, 64, 64]
    uint8 0/1, the factors of :func:`make_chunk` (``visibility``: in any frame) and
    ``frame_visibility`` [n, 7, 16] float32.

    Raises:
        DatasetError: when MuJoCo is not installed or cannot render headless.
    """
    return _render_scenes(rng, n, frames=NUM_FRAMES)


SPECS = (
    DatasetSpec(
        name="objects_room", image_shape=(IMAGE_SIZE, IMAGE_SIZE, 3), num_groups=NUM_GROUPS,
        make_chunk=make_chunk, background_groups=NUM_BACKGROUND,
        description="iodine_pyro.data.objects_room: a cubic room (sky, floor, two wall halves) "
                    "with 3 objects, 1-3 in view, 64x64, rendered with MuJoCo"),
    DatasetSpec(
        name="objects_room_sequences", image_shape=(IMAGE_SIZE, IMAGE_SIZE, 3), num_groups=NUM_GROUPS,
        make_chunk=make_sequence_chunk, background_groups=NUM_BACKGROUND, frames=NUM_FRAMES,
        description="iodine_pyro.data.objects_room: 16-frame camera flights through Objects Room "
                    "scenes, 64x64, rendered with MuJoCo",
        factor_dims={"color": ("rgb",), "frame_visibility": ("frame",)}),
)
