"""A seeded synthetic driving world: multi-camera road scenes with ground truth, and DriveLM-style QA.

Coordinates: ego frame, x forward, y left, metres. Each camera looks along its yaw with a 70 degree
horizontal field of view; objects are drawn by a pinhole projection of their bearing and distance.
"""
import math
import random
from dataclasses import asdict, dataclass, field

import cv2
import numpy as np

CAMERAS = ("CAM_FRONT", "CAM_FRONT_LEFT", "CAM_FRONT_RIGHT", "CAM_BACK", "CAM_BACK_LEFT", "CAM_BACK_RIGHT")
CAMERA_YAW_DEG = {"CAM_FRONT": 0, "CAM_FRONT_LEFT": 55, "CAM_FRONT_RIGHT": -55,
                  "CAM_BACK": 180, "CAM_BACK_LEFT": 110, "CAM_BACK_RIGHT": -110}
FOV_DEG = 70.0
NEAR_M = 30.0  # "within 30 m", as the OWLed paper counts objects
ACTIONS = ("keep_lane", "slow_down", "stop", "change_lane_left")
ACTION_TEXT = {"keep_lane": "Keep lane", "slow_down": "Slow down", "stop": "Stop", "change_lane_left": "Change lane to the left"}
LIGHT_STATES = ("red", "yellow", "green")
MAX_VEHICLES, MAX_PEDESTRIANS = 4, 3  # per scene, so also within 30 m
OBJECT_SIZE_M = {"car": (1.8, 1.5), "truck": (2.5, 3.2), "pedestrian": (0.6, 1.75), "cyclist": (0.7, 1.7)}
OBJECT_COLORS = {"car": [(200, 40, 40), (40, 80, 200), (230, 230, 230), (30, 30, 30), (40, 160, 60)],
                 "truck": [(220, 180, 40), (120, 120, 120)], "pedestrian": [(250, 120, 0), (150, 0, 150)],
                 "cyclist": [(0, 170, 200)]}


@dataclass
class Agent:
    label: str
    x: float  # forward, m
    y: float  # left, m
    moving: bool
    crossing: bool = False  # a pedestrian about to cross the ego lane
    color: tuple = (200, 40, 40)
    # where it is along and across the ego lane (m; left positive) where the road curves (the MetaDrive world);
    # None where the lane is the ego frame's x axis (this world)
    lane_x: float | None = None
    lane_y: float | None = None

    @property
    def along(self):
        return self.x if self.lane_x is None else self.lane_x

    @property
    def across(self):
        return self.y if self.lane_y is None else self.lane_y

    @property
    def distance(self):
        return math.hypot(self.x, self.y)

    @property
    def bearing_deg(self):
        return math.degrees(math.atan2(self.y, self.x))


# the distances the careful driver (Scene.decide) acts on, in metres
RED_STOP_M, STOPPED_LEAD_M, CLOSE_LEAD_M = 40, 25, 15


@dataclass
class Scene:
    seed: int
    ego_speed_mps: float
    agents: list = field(default_factory=list)
    light: str = "none"  # red / yellow / green / none
    light_distance: float = float("nan")
    stop_sign: bool = False

    def near(self, *labels):
        return [a for a in self.agents if a.label in labels and a.distance <= NEAR_M]

    def lead_vehicle(self):
        ahead = [a for a in self.agents if a.label in ("car", "truck") and a.along > 0 and abs(a.across) < 1.8]
        return min(ahead, key=lambda a: a.along, default=None)

    def left_lane_busy(self):
        return any(a.label in ("car", "truck") and 1.8 < a.across < 5.4 and -10 < a.along < 30 for a in self.agents)

    def decide(self):
        """(action, reason) a careful driver takes; the ground truth for planning questions."""
        lead = self.lead_vehicle()
        if self.light == "red" and self.light_distance < RED_STOP_M:
            return "stop", "the traffic light is red"
        if any(a.crossing for a in self.agents):
            return "stop", "a pedestrian is crossing"
        if lead is not None and not lead.moving and lead.along < STOPPED_LEAD_M:
            return ("stop", "the vehicle ahead is stopped") if self.left_lane_busy() else ("change_lane_left", "the vehicle ahead is stopped")
        if self.light == "yellow":
            return "slow_down", "the traffic light is yellow"
        if self.stop_sign:
            return "slow_down", "there is a stop sign"
        if lead is not None and lead.along < CLOSE_LEAD_M:
            return "slow_down", "a vehicle is close ahead"
        return "keep_lane", "the road ahead is clear"

    @property
    def action(self):
        return self.decide()[0]

    def truth(self):
        return {"n_cars": len(self.near("car", "truck")), "n_pedestrians": len(self.near("pedestrian", "cyclist")),
                "light": self.light, "light_distance": None if self.light == "none" else round(self.light_distance, 1),
                "stop_sign": self.stop_sign, "action": self.action, "ego_speed_mps": round(self.ego_speed_mps, 1),
                "target_speed_mps": target_speed(self.action, self.ego_speed_mps),
                "agents": [asdict(a) | {"camera": camera_of(a)} for a in self.agents]}


def scene_from_truth(truth, seed=0):
    """The Scene a `Scene.truth()` dict (as stored in a QA set) describes: its QA and tags come out the same."""
    agents = [Agent(**{k: (tuple(v) if k == "color" else v) for k, v in a.items() if k != "camera"}) for a in truth["agents"]]
    distance = float("nan") if truth["light_distance"] is None else truth["light_distance"]
    return Scene(seed=seed, ego_speed_mps=truth["ego_speed_mps"], agents=agents, light=truth["light"],
                 light_distance=distance, stop_sign=truth["stop_sign"])


def target_speed(action, ego_speed):
    return {"stop": 0.0, "slow_down": round(ego_speed / 2, 1)}.get(action, round(ego_speed, 1))


def camera_of(agent):
    def offset(camera):
        return abs((agent.bearing_deg - CAMERA_YAW_DEG[camera] + 180) % 360 - 180)
    return min(CAMERAS, key=offset)


def sample_scene(seed):
    rng = random.Random(seed)
    scene = Scene(seed=seed, ego_speed_mps=rng.uniform(3, 15))
    for _ in range(rng.randint(0, MAX_VEHICLES)):  # vehicles in the ego lane, left lane, oncoming lane, behind
        lane_y = rng.choice([0.0, 3.6, -3.6])
        label = rng.choice(["car", "car", "car", "truck"])
        scene.agents.append(Agent(label, rng.uniform(-35, 60), lane_y + rng.uniform(-0.4, 0.4), rng.random() < 0.7,
                                  color=rng.choice(OBJECT_COLORS[label])))
    for _ in range(rng.choice([0, 0, 1, 1, 2, MAX_PEDESTRIANS])):
        label = "pedestrian" if rng.random() < 0.8 else "cyclist"
        side = rng.choice([1, -1])
        crossing = label == "pedestrian" and rng.random() < 0.25
        x = rng.uniform(6, 28) if crossing else rng.uniform(-25, 45)
        y = side * (rng.uniform(2.0, 3.0) if crossing else rng.uniform(6.5, 9.0))
        scene.agents.append(Agent(label, x, y, crossing or rng.random() < 0.5, crossing,
                                  color=rng.choice(OBJECT_COLORS[label])))
    if rng.random() < 0.6:
        scene.light = rng.choice(LIGHT_STATES)
        scene.light_distance = rng.uniform(10, 55)
    scene.stop_sign = scene.light == "none" and rng.random() < 0.2
    return scene


def _project(camera, x, y, width, focal):
    """(image column, forward depth, inside the view) of a ground point in a camera."""
    yaw = math.radians(CAMERA_YAW_DEG[camera])
    forward = x * math.cos(yaw) + y * math.sin(yaw)
    left = -x * math.sin(yaw) + y * math.cos(yaw)
    visible = forward >= 1.0 and abs(math.degrees(math.atan2(left, forward))) <= FOV_DEG / 2 + 5
    return width / 2 - focal * left / max(forward, 0.1), max(forward, 0.1), visible


def render_view(scene, camera, height=192, width=336):
    """RGB uint8 image of one camera view."""
    rng = np.random.default_rng(scene.seed * 7 + CAMERAS.index(camera))
    focal = width / 2 / math.tan(math.radians(FOV_DEG / 2))
    horizon = int(height * 0.45)
    cam_height = 1.6
    image = np.empty((height, width, 3), np.uint8)
    image[:horizon] = (135, 180, 230)
    image[horizon:] = (90, 140, 80)

    def ground_row(forward):
        return int(horizon + focal * cam_height / forward)

    if camera in ("CAM_FRONT", "CAM_BACK"):
        sign = 1 if camera == "CAM_FRONT" else -1

        def point(x, y):
            u, forward, _ = _project(camera, sign * x, y, width, focal)
            return int(u), ground_row(forward)

        road = [point(2, 5.4), point(80, 5.4), point(80, -5.4), point(2, -5.4)]
        cv2.fillPoly(image, [np.array(road, np.int32)], (70, 70, 75))
        for lane_y in (1.8, -1.8):
            for x0 in np.arange(3.0, 60.0, 6.0):
                cv2.line(image, point(x0, lane_y), point(x0 + 3, lane_y), (240, 240, 240), max(1, int(24 / x0)))
    else:
        # side views: road occupies the lower part towards the ego vehicle
        cv2.rectangle(image, (0, int(height * 0.72)), (width, height), (70, 70, 75), -1)
    image += rng.integers(0, 6, image.shape, dtype=np.uint8)

    drawables = [(a.label, a.x, a.y, a) for a in scene.agents]
    if scene.light != "none":
        drawables.append(("traffic_light", scene.light_distance, 6.0, None))
    if scene.stop_sign:
        drawables.append(("stop_sign", 18.0, 6.0, None))
    for label, x, y, agent in sorted(drawables, key=lambda d: -math.hypot(d[1], d[2])):
        if agent is not None and camera_of(agent) != camera:
            continue
        u, forward, visible = _project(camera, x, y, width, focal)
        if not visible:
            continue
        base = ground_row(forward)
        scale = focal / forward
        if label in OBJECT_SIZE_M:
            w_m, h_m = OBJECT_SIZE_M[label]
            w, h = max(2, int(w_m * scale)), max(3, int(h_m * scale))
            color = tuple(int(c) for c in agent.color)
            if label == "pedestrian" or label == "cyclist":
                cv2.rectangle(image, (int(u - w / 2), base - int(h * 0.8)), (int(u + w / 2), base), color, -1)
                cv2.circle(image, (int(u), base - int(h * 0.9)), max(1, int(w * 0.4)), (230, 190, 160), -1)
                if label == "cyclist":
                    cv2.circle(image, (int(u), base - max(1, h // 8)), max(1, h // 6), (20, 20, 20), 1)
            else:
                cv2.rectangle(image, (int(u - w / 2), base - h), (int(u + w / 2), base), color, -1)
                cv2.rectangle(image, (int(u - w * 0.4), base - h + max(1, h // 8)),
                              (int(u + w * 0.4), base - h // 2), (40, 50, 70), -1)
                if not agent.moving:  # lit brake lights mark a stopped vehicle
                    for side in (-0.4, 0.4):
                        cv2.circle(image, (int(u + side * w), base - h // 3), max(1, w // 10), (255, 0, 0), -1)
        elif label == "traffic_light":
            pole_h, box_w = int(5.0 * scale), max(3, int(0.5 * scale))
            top = base - pole_h
            cv2.line(image, (int(u), base), (int(u), top), (50, 50, 50), max(1, box_w // 3))
            cv2.rectangle(image, (int(u - box_w), top - 3 * box_w), (int(u + box_w), top + 3 * box_w), (20, 20, 20), -1)
            lit = {"red": 0, "yellow": 1, "green": 2}[scene.light]
            for i, color in enumerate([(255, 0, 0), (255, 200, 0), (0, 230, 0)]):
                shade = color if i == lit else tuple(c // 5 for c in color)
                cv2.circle(image, (int(u), top - 2 * box_w + 2 * i * box_w), max(1, int(box_w * 0.8)), shade, -1)
        elif label == "stop_sign":
            r = max(3, int(0.5 * scale))
            cv2.line(image, (int(u), base), (int(u), base - int(2.2 * scale)), (90, 90, 90), max(1, r // 4))
            octagon = [(u + r * math.cos(math.pi / 8 + k * math.pi / 4), base - int(2.2 * scale) + r * math.sin(math.pi / 8 + k * math.pi / 4)) for k in range(8)]
            cv2.fillPoly(image, [np.array(octagon, np.int32)], (220, 0, 0))
    return image


def render(scene, cameras=CAMERAS, height=192, width=336):
    return {camera: render_view(scene, camera, height, width) for camera in cameras}


def count_text(n, noun):
    return f"{n} {noun}" + ("" if n == 1 else "s")


def light_answer(light):
    return "There is no traffic light." if light == "none" else f"The traffic light is {light}."


def describe(scene):
    """The reference answer to the perception question."""
    text = (f"There are {count_text(len(scene.near('car', 'truck')), 'vehicle')} and "
            f"{count_text(len(scene.near('pedestrian', 'cyclist')), 'pedestrian')} within 30 meters. ")
    return text + light_answer(scene.light) + (" There is a stop sign." if scene.stop_sign else "")


BEHAVIOR = {"keep_lane": "going straight at a steady speed", "slow_down": "going straight and slowing down",
            "stop": "slowing down to a stop", "change_lane_left": "changing to the left lane"}
QUESTIONS = {
    "perception": "What are the important objects in the current scene?",
    "lights": "What is the state of the traffic light?",
    "crossing": "Will a pedestrian cross in front of the ego vehicle?",
    "lead": "Is the vehicle ahead of the ego vehicle moving?",
    "planning": "What should the ego vehicle do?",
    "behavior": "Predict the behavior of the ego vehicle.",
}
CATEGORY = {"perception": "perception", "lights": "perception", "crossing": "prediction", "lead": "prediction",
            "planning": "planning", "behavior": "behavior"}
LEAD_STATES = ("none", "moving", "stopped")


def crossing_answer(crossing):
    return "Yes, a pedestrian is crossing." if crossing else "No."


def lead_answer(state):
    return {"none": "There is no vehicle ahead.", "moving": "Yes, it is moving.", "stopped": "No, it is stopped."}[state]


def planning_answer(action, reason):
    return f"{ACTION_TEXT[action]}, because {reason}."


def behavior_answer(action):
    return f"The ego vehicle is {BEHAVIOR[action]}."


def qa(scene):
    """DriveLM-style question/answer pairs with ground truth, one per question kind."""
    action, reason = scene.decide()
    lead = scene.lead_vehicle()
    answers = {
        "perception": describe(scene),
        "lights": light_answer(scene.light),
        "crossing": crossing_answer(any(a.crossing for a in scene.agents)),
        "lead": lead_answer("none" if lead is None else "moving" if lead.moving else "stopped"),
        "planning": planning_answer(action, reason),
        "behavior": behavior_answer(action),
    }
    return [{"id": f"{scene.seed}-{kind}", "kind": kind, "category": CATEGORY[kind], "question": QUESTIONS[kind],
             "answer": answers[kind]} for kind in QUESTIONS]
