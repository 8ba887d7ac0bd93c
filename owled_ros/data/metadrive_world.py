"""The MetaDrive world: seeded 3-D driving scenes seen by six cameras, with ground truth turned into the
same DriveLM-style QA as the 2-D world (data/world.py).

MetaDrive 0.3.0.1 (code Apache-2.0; 3-D models CC-BY-4.0 by the MetaDrive authors) ships its assets in the
wheel and renders headless on the CPU, but pins numpy 1.24 and gym 0.25: it runs in its own venv
(.venv-world, made by scripts/setup.sh) and writes the calibration format, which the main venv reads.
`owled world` starts this module there; it imports only numpy, OpenCV and owled_ros.data.{calib,world}.

A scene: a procedural map (straight roads, curves, X/T intersections, roundabouts, ramps) from a map seed,
MetaDrive's traffic at a sampled density driven for a few steps, then what the QA needs placed on the ego
lane: a traffic light in a state at a distance, pedestrians crossing ahead or on the roadside, a stopped
lead vehicle. Ground truth is read back from the engine's objects, in the ego frame (x forward, y left).
"""
import argparse
import dataclasses
import functools
import json
import math
import os
import random
import subprocess
import sys
import tempfile
from pathlib import Path

import cv2
import numpy as np

from owled_ros.data.calib import ShardWriter, read_samples
from owled_ros.data.world import CAMERA_YAW_DEG, CAMERAS, LIGHT_STATES, Agent, Scene, qa

SIZE = (128, 224)  # height, width: the default model's image size
FOV_DEG = 70.0
CAMERA_PITCH_DEG = -6.0
MOUNT_FORWARD_M, MOUNT_BACK_M, MOUNT_HEIGHT_M = 1.0, 2.4, 1.5  # front views from the windscreen, back views from the tail
MAP_SEEDS = 200  # distinct procedural maps for training scenes; held-out scenes get 200 others
HELDOUT_SEED = 1_000_000  # scene seeds from here on are held out (evaluation, demo, bench)
# shipped: 12 held-out scenes, `owled calib world DIR --count 12 --seed 2000000 --shard-size 12`
DEMO_FRAMES = Path(__file__).with_name("demo_world")
# shipped: 16 other held-out scenes, on maps the demo's scenes do not use, that the demo calibrates on:
# `owled calib world DIR --count 16 --seed 2100064 --shard-size 16`
DEMO_CALIB = Path(__file__).with_name("demo_calib")
WARMUP_STEPS = (5, 40)  # physics steps of traffic before the cameras fire
MOVING_MPS = 0.5
LIGHT_STATUS = {1: "green", 2: "red", 3: "yellow"}  # TrafficLightStatus
VEHICLE_NAMES = ("DefaultVehicle", "SVehicle", "MVehicle", "LVehicle", "XLVehicle")


@dataclasses.dataclass
class Spec:
    """What one scene asks for; `sample_spec(seed)` draws one, tests write their own."""
    seed: int
    map_seed: int = 0
    traffic_density: float = 0.1
    warmup_steps: int = 10
    light: str = "none"  # red / yellow / green / none, on the ego lane at light_distance
    light_distance: float = 30.0
    pedestrians: list = dataclasses.field(default_factory=list)  # [forward m, left m, crossing]
    vehicles: list = dataclasses.field(default_factory=list)  # [forward m, lanes to the left (-1, 0, 1), speed m/s]
    dropout: str = ""  # a camera whose view is lost


def sample_spec(seed):
    rng = random.Random(seed)
    spec = Spec(seed=seed, map_seed=rng.randrange(MAP_SEEDS) + (MAP_SEEDS if seed >= HELDOUT_SEED else 0), traffic_density=rng.choice([0.0, 0.05, 0.1, 0.2, 0.3]),
                warmup_steps=rng.randint(*WARMUP_STEPS))
    if rng.random() < 0.6:
        spec.light, spec.light_distance = rng.choice(LIGHT_STATES), round(rng.uniform(10, 55), 1)
    for _ in range(rng.choice([0, 0, 1, 1, 2, 3])):
        side = rng.choice([1, -1])
        if rng.random() < 0.25:  # crossing ahead, in or beside the ego lane
            spec.pedestrians.append([round(rng.uniform(6, 28), 1), round(side * rng.uniform(0.0, 2.5), 1), True])
        else:  # on the roadside, ahead or behind
            spec.pedestrians.append([round(rng.uniform(-25, 45), 1), round(side * rng.uniform(6.5, 9.0), 1), False])
    for _ in range(rng.randint(0, 4)):  # besides MetaDrive's traffic: ahead, beside and behind, some stopped
        lanes_left = rng.choice([0, 0, 1, -1])
        forward = rng.uniform(-30, 55)
        if lanes_left == 0 and abs(forward) < 7:
            continue
        speed = 0.0 if rng.random() < 0.35 else rng.uniform(3, 12)
        spec.vehicles.append([round(forward, 1), lanes_left, round(speed, 1)])
    if rng.random() < 0.1:
        spec.dropout = rng.choice(CAMERAS)
    return spec


def _headless_fixes():
    """Settings MetaDrive needs on Mesa's llvmpipe (checked on this machine): 4x MSAA at most."""
    import metadrive.engine.core.our_pbr as our_pbr

    init = our_pbr.OurPipeline.__init__

    def four_samples(self, *args, **kwargs):
        init(self, *args, **(kwargs | {"msaa_samples": 4}))

    our_pbr.OurPipeline.__init__ = four_samples


def no_anisotropy():
    """Anisotropic filtering on llvmpipe costs 7-12 s a view: off on every loaded texture (maps and
    objects bring new ones)."""
    from panda3d.core import TexturePool

    for texture in TexturePool.findAllTextures():
        texture.setAnisotropicDegree(1)


class MetaDriveWorld:
    def __init__(self, size=SIZE):
        _headless_fixes()
        from metadrive.envs.metadrive_env import MetaDriveEnv

        self.height, self.width = size
        self.env = MetaDriveEnv(dict(
            use_render=False, image_observation=True, start_seed=0, environment_num=2 * MAP_SEEDS, map=3,
            vehicle_config=dict(image_source="rgb_camera", rgb_camera=(self.width, self.height)),
            multi_thread_render=False,  # else a GLES 1.1 context and a crash
            show_interface=False, show_logo=False, show_fps=False, horizon=10_000))
        self.spawned = []

    def scene(self, spec):
        """(Scene with ground truth, {camera: RGB uint8}) for a Spec."""
        env = self.env
        env.config["traffic_density"] = spec.traffic_density  # the engine reads this Config object at reset
        # A map's lane markings and kerbs get small random heights (against z-fighting) from numpy's global
        # generator when the map is built: unseeded, the same scene rendered in another process differed by up
        # to 50 grey levels in a quarter of its pixels.
        np.random.seed(spec.map_seed)
        env.reset(force_seed=spec.map_seed)
        no_anisotropy()
        rng = random.Random(spec.seed)
        self._teleport(rng)
        throttle = rng.uniform(0.2, 0.8)
        for _ in range(max(1, spec.warmup_steps)):  # a step also localises the ego on its new lane
            env.step([0.0, throttle])
        crossing = self._place(spec)
        no_anisotropy()
        scene = ground_truth(env.engine, env.vehicle, crossing, spec.seed)
        images = {camera: self._view(camera) for camera in CAMERAS if camera != spec.dropout}
        env.engine.clear_objects([o.id for o in self.spawned])  # kept for reuse: destroying a vehicle would take the shared camera
        self.spawned = []
        return scene, images

    def _teleport(self, rng):
        """The ego somewhere on the map (not always at its start): at least 15 m into a lane and 20 m before
        its end where the map has lanes of 50 m (objects are placed on the ego's lane segment and its neighbours)."""
        graph = self.env.engine.current_map.road_network.graph
        every = [lane for ends in graph.values() for lanes in ends.values() for lane in lanes]
        lane = rng.choice([lane for lane in every if lane.length >= 50] or [max(every, key=lambda lane: lane.length)])
        along = rng.uniform(15, lane.length - 20) if lane.length >= 50 else lane.length / 3
        ego = self.env.vehicle
        ego.set_position(lane.position(along, 0))
        ego.set_heading_theta(lane.heading_theta_at(along))

    def _place(self, spec):
        """Spawn the spec's light, pedestrians and stopped lead on the ego lane; returns the crossing ids."""
        from metadrive.component.traffic_light.base_traffic_light import BaseTrafficLight
        from metadrive.component.traffic_participants.pedestrian import Pedestrian
        from metadrive.component.vehicle.vehicle_type import LVehicle, MVehicle, SVehicle, XLVehicle

        engine, ego = self.env.engine, self.env.vehicle
        rng = random.Random(spec.seed)
        lane = ego.lane
        s, _ = lane.local_coordinates(ego.position)
        heading = lane.heading_theta_at(s)
        if spec.light != "none":
            light = engine.spawn_object(BaseTrafficLight, lane=lane)
            light.set_position(lane.position(s + spec.light_distance, 0))
            light.set_heading_theta(heading)
            {"red": light.set_red, "yellow": light.set_yellow, "green": light.set_green}[spec.light]()
            # Lamps give their own light: unlit by the scene's sun, whose shading left the face the ego sees
            # black whenever the sun stood behind the light (its colour showed only in side views on curves).
            light.origin.setLightOff(1)
            self.spawned.append(light)
        crossing = set()
        for forward, left, walking in spec.pedestrians:
            position = lane.position(s + forward, -left)  # MetaDrive's y axis points right of x
            person = engine.spawn_object(Pedestrian, position=position,
                                         heading_theta=heading + (math.pi / 2 if left <= 0 else -math.pi / 2))
            self.spawned.append(person)
            if walking:
                crossing.add(person.id)
        for forward, lanes_left, speed in spec.vehicles:
            target = neighbour_lane(engine, ego, lane, lanes_left)
            along = None if target is None else target.local_coordinates(ego.position)[0] + forward
            if along is None or not 0 <= along <= target.length:  # no such lane here, or off its road segment
                continue
            vehicle = engine.spawn_object(placed_class(rng.choice((SVehicle, MVehicle, LVehicle, XLVehicle))),
                                          vehicle_config={"spawn_lane_index": target.index, "spawn_longitude": float(along)})
            vehicle.set_velocity([math.cos(vehicle.heading_theta), math.sin(vehicle.heading_theta)], speed)
            self.spawned.append(vehicle)
        return crossing

    def _view(self, camera):
        sensor = self.env.vehicle.image_sensors["rgb_camera"]
        lens = sensor.get_lens()
        lens.setFov(FOV_DEG)
        lens.setAspectRatio(self.width / self.height)
        yaw = CAMERA_YAW_DEG[camera]
        sensor.get_cam().setPos(0, MOUNT_FORWARD_M if abs(yaw) < 90 else -MOUNT_BACK_M, MOUNT_HEIGHT_M)
        sensor.get_cam().setHpr(yaw, CAMERA_PITCH_DEG, 0)
        self.env.engine.graphicsEngine.renderFrame()
        bgr = sensor.get_pixels_array(self.env.vehicle, clip=False)
        return np.ascontiguousarray(cv2.cvtColor(bgr, cv2.COLOR_BGR2RGB))


@functools.cache
def placed_class(vehicle_class):
    """A subclass per vehicle model for the vehicles placed here: MetaDrive recycles cleared objects by class
    name, and its traffic manager must not get ours (nor we its own) back with the other's configuration."""
    return type(f"Placed{vehicle_class.__name__}", (vehicle_class,), {})


def neighbour_lane(engine, ego, lane, lanes_left):
    """The lane of the ego's road whose centre is `lanes_left` lane widths to the ego lane's left, if any."""
    s, _ = lane.local_coordinates(ego.position)
    wanted = to_ego(ego, lane.position(s, 0))[1] + lanes_left * lane.width_at(s)
    lanes = engine.current_map.road_network.graph[lane.index[0]][lane.index[1]]
    miss = {candidate: abs(to_ego(ego, candidate.position(s, 0))[1] - wanted) for candidate in lanes}
    best = min(miss, key=miss.get)
    return best if miss[best] < 1.0 else None


def to_ego(ego, position):
    """MetaDrive (x, y) -> ego frame (x forward, y left); MetaDrive's y points right of its x."""
    dx, dy = position[0] - ego.position[0], position[1] - ego.position[1]
    c, s = math.cos(ego.heading_theta), math.sin(ego.heading_theta)
    return dx * c + dy * s, dx * s - dy * c


def lamp_pixels(image, colour):
    """Pixels in the upper half of a view (above the horizon, where a light's lamps are) of a lit lamp's
    colour: red, yellow or green."""
    sky = image[: image.shape[0] // 2].astype(int)
    red, green, blue = sky[..., 0], sky[..., 1], sky[..., 2]
    lit = {"red": (red >= 150) & (red - green >= 70) & (red - blue >= 70),
           "yellow": (red >= 150) & (green >= 130) & (red - blue >= 90),
           "green": (green >= 120) & (green - red >= 50) & (green - blue >= 20)}[colour]
    return int(lit.sum())


def ground_truth(engine, ego, crossing_ids, seed):
    """A data/world.Scene from the engine's objects: vehicles and pedestrians in the ego frame and along/across
    the ego's lane (where the road curves, what is ahead in the lane is not straight ahead), the nearest traffic
    light ahead on the ego lane (state, distance along the lane)."""
    scene = Scene(seed=seed, ego_speed_mps=float(ego.speed))
    lane = ego.lane
    ego_along, ego_across = lane.local_coordinates(ego.position)
    lights = []
    for obj in engine.get_objects().values():
        kind = type(obj).__name__.removeprefix("Placed")
        if obj is ego or not hasattr(obj, "position"):
            continue
        x, y = to_ego(ego, obj.position)
        along, across = lane.local_coordinates(obj.position)
        along, across = round(along - ego_along, 2), round(ego_across - across, 2)  # MetaDrive's lateral points right
        if kind in VEHICLE_NAMES:
            label = "truck" if kind == "XLVehicle" else "car"
            scene.agents.append(Agent(label, round(x, 2), round(y, 2), float(obj.speed) > MOVING_MPS, lane_x=along, lane_y=across))
        elif kind == "Pedestrian":
            walking = obj.id in crossing_ids
            scene.agents.append(Agent("pedestrian", round(x, 2), round(y, 2), walking, crossing=walking, lane_x=along, lane_y=across))
        elif kind == "BaseTrafficLight" and obj.status in LIGHT_STATUS and along > 0 and abs(across) < 2.0:
            lights.append((along, LIGHT_STATUS[obj.status]))
    if lights:
        distance, scene.light = min(lights)
        scene.light_distance = round(distance, 1)
    return scene


def write(out, specs, shard_size=64, vehicle="metadrive", progress=True):
    """Render the specs into shards of a calibration set at `out`; returns the number of frame sets."""
    from tqdm import tqdm

    world = MetaDriveWorld()
    written = 0
    bar = tqdm(total=len(specs), desc="rendering", unit="scene", disable=not progress, file=sys.stderr)
    for start in range(0, len(specs), shard_size):
        with ShardWriter(out, f"{vehicle}-{specs[start].seed:07d}") as writer:
            for spec in specs[start:start + shard_size]:
                scene, images = world.scene(spec)
                writer.add(f"{vehicle}-{spec.seed}", images, stamp_ns=spec.seed * 100_000_000,
                           source=f"metadrive:map={spec.map_seed}", vehicle=vehicle, qa=qa(scene),
                           truth=scene.truth() | {"spec": dataclasses.asdict(spec)})
                written += 1
                bar.update()
    bar.close()
    return written


def world_python():
    python = Path(os.environ.get("OWLED_WORLD_PYTHON") or Path(__file__).parents[2] / ".venv-world" / "bin" / "python")
    if not python.exists():
        raise FileNotFoundError(f"the MetaDrive venv's python was not found at {python}: run `make world` "
                                "(it makes .venv-world), or set OWLED_WORLD_PYTHON")
    return python


def render_world(out, seeds=None, specs=None, shard_size=64):
    """From the main venv: render scenes (seeds = (first, count), or a list of Spec) into a calibration set at
    `out` by running this module in the MetaDrive venv; returns the samples written."""
    command = [str(world_python()), "-m", __name__, str(out), "--shard-size", str(shard_size)]
    with tempfile.TemporaryDirectory() as tmp:
        if specs is not None:
            path = Path(tmp) / "specs.json"
            path.write_text(json.dumps([dataclasses.asdict(spec) for spec in specs]))
            command += ["--specs", str(path)]
        else:
            command += ["--seeds", f"{seeds[0]}:{seeds[1]}"]
        root = str(Path(__file__).parents[2])
        done = subprocess.run(command, env=os.environ | {"PYTHONPATH": root}, stdout=subprocess.PIPE, text=True)
    if done.returncode != 0:
        raise ChildProcessError(f"the MetaDrive renderer failed (exit {done.returncode}); its messages are above")
    return read_samples(out)


def main(argv=None):
    parser = argparse.ArgumentParser(description="render MetaDrive scenes into a calibration set (run in .venv-world)")
    parser.add_argument("out", type=Path)
    parser.add_argument("--seeds", help="first:count, scenes drawn by sample_spec")
    parser.add_argument("--specs", type=Path, help="JSON list of Spec fields instead of drawn scenes")
    parser.add_argument("--shard-size", type=int, default=64)
    parser.add_argument("--vehicle", default="metadrive")
    args = parser.parse_args(argv)
    if args.specs:
        specs = [Spec(**fields) for fields in json.loads(args.specs.read_text())]
    else:
        first, count = (int(v) for v in args.seeds.split(":"))
        specs = [sample_spec(seed) for seed in range(first, first + count)]
    written = write(args.out, specs, args.shard_size, args.vehicle)
    print(f"wrote {written} frame sets to {args.out}", flush=True)
    sys.stderr.flush()
    os._exit(0)  # a normal interpreter exit can abort in a camera destructor


if __name__ == "__main__":
    main()
