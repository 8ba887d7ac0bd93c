"""Drive node: camera topics in -> PerceptionDescription, PredictedAction, QAAnswer (+ diagnostics) out.

Callbacks only convert and group images; one worker thread runs the model on the newest complete frame
set (older unprocessed sets are dropped and counted) and answers queued questions and owled/ask requests, so
nothing the executor runs waits for inference.
"""
import collections
import gc
import math
import os
import signal
import sys
import threading
import time
import uuid

import numpy as np
import rclpy
from builtin_interfaces.msg import Duration, Time
from diagnostic_msgs.msg import DiagnosticArray, DiagnosticStatus, KeyValue
from geometry_msgs.msg import Point, Pose, Quaternion, Vector3
from rclpy.clock import Clock, ClockType
from rclpy.executors import ExternalShutdownException, SingleThreadedExecutor
from rclpy.lifecycle import LifecycleNode, TransitionCallbackReturn
from rclpy.signals import SignalHandlerOptions
from rclpy.qos import QoSProfile, QoSReliabilityPolicy, qos_profile_sensor_data
from rclpy.task import Future
from sensor_msgs.msg import CompressedImage, Image
from std_msgs.msg import ColorRGBA, Header
from visualization_msgs.msg import Marker, MarkerArray

from owled_ros.data.frames import SYNC_SLOP_S, FrameSync, LatestSlot
from owled_ros.data.images import MAX_PIXELS, ImageError, draw_answers, to_rgb
from owled_ros.eval.parse import parse_action, parse_description, parse_speed
from owled_ros.msg import ModelInfo, ObjectDescription, PerceptionDescription, PredictedAction, QAAnswer, Question
from owled_ros.srv import Ask

ACTION_CODES = {"keep_lane": PredictedAction.ACTION_KEEP_LANE, "slow_down": PredictedAction.ACTION_SLOW_DOWN,
                "stop": PredictedAction.ACTION_STOP, "turn_left": PredictedAction.ACTION_TURN_LEFT,
                "turn_right": PredictedAction.ACTION_TURN_RIGHT, "change_lane_left": PredictedAction.ACTION_CHANGE_LANE_LEFT,
                "change_lane_right": PredictedAction.ACTION_CHANGE_LANE_RIGHT,
                "accelerate": PredictedAction.ACTION_ACCELERATE}
CARLA_TOPICS = ["/carla/ego_vehicle/rgb_front/image", "/carla/ego_vehicle/rgb_front_left/image",
                "/carla/ego_vehicle/rgb_front_right/image", "/carla/ego_vehicle/rgb_back/image",
                "/carla/ego_vehicle/rgb_back_left/image", "/carla/ego_vehicle/rgb_back_right/image"]
DTYPES = ("float32", "bfloat16")
STEADY = Clock(clock_type=ClockType.STEADY_TIME)
HISTORY_QUESTIONS = 64  # distinct questions whose answers are kept for draft_tokens
NUSCENES_CAMERAS = ["CAM_FRONT", "CAM_FRONT_LEFT", "CAM_FRONT_RIGHT", "CAM_BACK", "CAM_BACK_LEFT", "CAM_BACK_RIGHT"]


def declare_camera_parameters(node):
    """Camera parameters shared by the drive and recorder nodes: topics, view names, transports, grouping."""
    node.declare_parameter("camera_topics", CARLA_TOPICS)
    node.declare_parameter("camera_names", NUSCENES_CAMERAS)
    node.declare_parameter("camera_transports", ["raw"] * len(CARLA_TOPICS))  # raw | compressed, per topic
    node.declare_parameter("sync_slop_s", SYNC_SLOP_S)  # under half the camera period
    node.declare_parameter("view_timeout_s", 1.0)
    node.declare_parameter("camera_reliability", "best_effort")  # best_effort (sensor data QoS) | reliable
    node.declare_parameter("max_image_pixels", MAX_PIXELS)  # larger images (raw or decoded) are refused unread
    topics, names, transports = (node.get_parameter(p).value for p in ("camera_topics", "camera_names", "camera_transports"))
    if not (len(topics) == len(names) == len(transports)) or not 1 <= len(topics) <= 6:
        raise ValueError("camera_topics, camera_names and camera_transports need the same length, 1 to 6")
    if set(transports) - {"raw", "compressed"}:
        raise ValueError(f"camera_transports must be raw or compressed, got {transports}")
    if node.get_parameter("camera_reliability").value not in ("best_effort", "reliable"):
        raise ValueError("camera_reliability must be best_effort or reliable")
    return list(zip(topics, names, transports))


def camera_qos(node):
    """Sensor-data QoS (best effort, matches reliable and best-effort drivers) unless reliable is asked for:
    large frames in bursts (six uncompressed views at once) can lose fragments under best effort."""
    if node.get_parameter("camera_reliability").value == "reliable":
        return QoSProfile(depth=10, reliability=QoSReliabilityPolicy.RELIABLE)
    return qos_profile_sensor_data


class CameraInput:
    """Subscribes to the cameras, converts images (counting bad ones) and groups them into frame sets."""

    def __init__(self, node, on_frame_set, cameras=None):
        self.node, self.on_frame_set = node, on_frame_set
        self.cameras = cameras or declare_camera_parameters(node)
        self.sync = FrameSync([name for _, name, _ in self.cameras], node.get_parameter("sync_slop_s").value,
                              node.get_parameter("view_timeout_s").value)
        self.bad_images, self.reported_absent, self.last_set = collections.Counter(), set(), None
        self.arrivals = {}  # camera -> (seconds from its stamp to its callback, seconds converting it)
        self.max_pixels = node.get_parameter("max_image_pixels").value
        qos = camera_qos(node)
        self.subscriptions = [node.create_subscription(CompressedImage if transport == "compressed" else Image, topic,
                                                       lambda msg, n=name, c=transport == "compressed": self.on_image(msg, n, c), qos)
                              for topic, name, transport in self.cameras]
        self.timer = node.create_timer(0.05, self.on_timer, clock=STEADY)  # view_timeout_s is wall time, sim time or not

    def stats(self):
        return {"unmade_frame_sets": self.sync.unmade, "dropped_views": self.sync.dropped_views,
                "missing_cameras": ",".join(sorted(self.reported_absent)),
                **{f"dropped_views.{k}": v for k, v in sorted(self.sync.dropped.items())},
                "bad_images": sum(self.bad_images.values()),
                **{f"bad_images.{k}": v for k, v in sorted(self.bad_images.items())}}

    def close(self):
        for subscription in self.subscriptions:
            self.node.destroy_subscription(subscription)
        self.node.destroy_timer(self.timer)

    def on_image(self, msg, camera, compressed):
        received, started = self.node.get_clock().now().nanoseconds / 1e9, time.perf_counter()  # sim time if used
        try:
            rgb = to_rgb(msg, compressed, self.max_pixels)
        except ImageError as error:
            self.bad_images[error.reason] += 1
            self.node.get_logger().warning(f"dropped {camera} frame: {error} ({sum(self.bad_images.values())} bad so far)",
                                           throttle_duration_sec=2.0)
            return
        stamp = msg.header.stamp.sec * 1_000_000_000 + msg.header.stamp.nanosec
        # camera stamp -> callback: transport time where the cameras stamp with this node's clock (or /clock)
        self.arrivals[camera] = (received - stamp / 1e9, time.perf_counter() - started)
        frame_set = self.sync.add(camera, stamp, rgb, msg.header.frame_id)
        if frame_set is not None:
            self.hand_on(frame_set)

    def on_timer(self):
        frame_set = self.sync.poll()
        if frame_set is not None:
            self.hand_on(frame_set)

    def hand_on(self, frame_set):
        self.last_set = time.monotonic()
        self.report_absence()
        if set(frame_set.missing) - self.reported_absent:
            self.node.get_logger().warning(f"partial frame set, missing {frame_set.missing}", throttle_duration_sec=5.0)
        views = [self.arrivals[camera] for camera in frame_set.images]
        frame_set.timing = {"transport_s": max(age for age, _ in views), "convert_s": sum(s for _, s in views),
                            "ready": time.monotonic()}
        self.on_frame_set(frame_set)

    def report_absence(self):
        """Once per change: a camera that stopped (the sets go on without it), or one that came back."""
        absent = set(self.sync.absent)
        for camera in sorted(absent - self.reported_absent):
            self.node.get_logger().warning(f"camera {camera} sent nothing for {self.sync.timeout_s:g} s: "
                                           "running on the other views until it is back")
        for camera in sorted(self.reported_absent - absent):
            self.node.get_logger().info(f"camera {camera} is back")
        self.reported_absent = absent


ACTION_COLOURS = {"stop": (255, 60, 60), "slow down": (255, 200, 0), "keep lane": (80, 220, 80), "accelerate": (80, 220, 80)}
LIGHT_COLOURS = {"red": (255, 60, 60), "yellow": (255, 200, 0), "green": (80, 220, 80)}


def stamp_msg(stamp_ns):
    return Time(sec=stamp_ns // 1_000_000_000, nanosec=stamp_ns % 1_000_000_000)


class DriveNode(LifecycleNode):
    """A managed (lifecycle) node: configure loads the model, activate subscribes and starts answering,
    deactivate stops without unloading, cleanup frees the model. With autostart (the default) it configures
    and activates itself at start-up; without, a lifecycle manager (or `ros2 lifecycle set`) drives it."""

    def __init__(self):
        super().__init__("owled_drive")
        self.declare_parameter("autostart", True)  # configure and activate at start-up; false: wait to be managed
        self.declare_parameter("model_dir", "default")  # "default", an owled_ros model or a transformers checkpoint
        self.declare_parameter("device", "cpu")
        # float32 | bfloat16: bfloat16 halves the decoding time here, but changes some answers (bench/drive_node.py)
        self.declare_parameter("dtype", "float32")
        # auto: the fastest runtime installed (bench/runtime.py), named in the log; torch | torch-int8 (least memory) | openvino | openvino-int8 | openvino-w8a8
        self.declare_parameter("backend", "auto")
        # 0: all cores but one, which stays free for camera reception (with every core, 10 Hz cameras slowed
        # torch eager 7-fold on 2 cores: bench/drive_node.py)
        self.declare_parameter("inference_threads", 0)
        self.declare_parameter("sparse_kernels", True)  # CUDA + bfloat16: a 2:4 model's linears on sparse tensor cores
        self.declare_parameter("max_new_tokens", 48)
        # guesses checked per decoding pass, copied from the latest answers to the same question (same answers
        # as plain greedy decoding, fewer passes where answers repeat); 0 decodes one token a pass
        self.declare_parameter("draft_tokens", 8)
        self.declare_parameter("draft_history", 16)  # earlier answers kept per question to copy guesses from
        self.declare_parameter("max_rate_hz", 1.0)
        self.declare_parameter("perception_question", "What are the important objects in the current scene?")
        self.declare_parameter("action_question", "What should the ego vehicle do?")
        self.declare_parameter("latency_window", 50)
        self.declare_parameter("latency_budget_s", 1.0)  # /diagnostics WARN when the model's p50 is above it
        self.declare_parameter("stale_after_s", 3.0)  # /diagnostics STALE when no frame set came for this long
        self.declare_parameter("question_queue", 16)
        self.declare_parameter("max_question_chars", 1000)  # longer questions are refused and counted
        self.declare_parameter("frame_id", "base_link")  # the vehicle frame of the answers and markers
        # owled/annotated (the first camera's view with the answers drawn) and owled/markers (RViz): off by
        # default, drawing and sending a full view costs the worker time
        self.declare_parameter("annotate", False)
        param = lambda name: self.get_parameter(name).value
        from owled_ros.runtime import BACKENDS  # here: the recorder node imports this module and needs no torch

        if param("dtype") not in DTYPES:
            raise ValueError(f"dtype must be one of {list(DTYPES)}, got {param('dtype')!r}")
        for name in ("draft_tokens", "draft_history"):
            if param(name) < 0:
                raise ValueError(f"{name} must be 0 or more, got {param(name)}")
        if param("inference_threads") < 0:
            raise ValueError(f"inference_threads must be 0 (all cores but one) or more, got {param('inference_threads')}")
        if param("backend") not in BACKENDS:
            raise ValueError(f"backend must be one of {list(BACKENDS)}, got {param('backend')!r}")
        self.camera_config = declare_camera_parameters(self)
        self.max_question_chars = param("max_question_chars")
        self.max_new_tokens, self.min_period = param("max_new_tokens"), 1.0 / param("max_rate_hz")
        self.draft_tokens, self.draft_history = param("draft_tokens"), param("draft_history")
        self.perception_question, self.action_question = param("perception_question"), param("action_question")
        self.latencies = collections.deque(maxlen=param("latency_window"))
        self.stages = collections.defaultdict(lambda: collections.deque(maxlen=param("latency_window")))
        self.questions = collections.deque(maxlen=param("question_queue"))
        self.asks = collections.deque()  # (owled/ask request, Future of its QAAnswer): a caller waits on each
        self.counts = collections.Counter()  # dropped/refused questions, worker errors
        self.latency_budget_s, self.stale_after_s = param("latency_budget_s"), param("stale_after_s")
        self.frame_id, self.annotate = param("frame_id"), param("annotate")
        self.model = self.cameras = self.worker = None
        self.model_lock = threading.Lock()
        self.configure_error = ""
        self.reset()
        self.diagnostics_pub = self.create_publisher(DiagnosticArray, "/diagnostics", 10)  # in every state
        self.create_timer(1.0, self.publish_diagnostics, clock=STEADY)  # on wall time: a paused /clock is reported STALE

    def reset(self):
        """What one activation counts and remembers."""
        self.history = {}  # question -> its latest answers; the questions asked most recently last
        self.processed, self.failing, self.last_error, self.unparsed_reported = 0, False, "", 0
        self.latest = None  # newest processed frame set, for questions
        self.slot = LatestSlot()
        self.started = time.monotonic()

    # ----- lifecycle -----
    def on_configure(self, state):
        """Load the model and compile it for its backend (the time logged); create the publishers."""
        try:
            self.load()
        except (ValueError, OSError) as error:
            self.model, self.configure_error = None, str(error)
            if not self.get_parameter("autostart").value:  # with autostart, the start-up error line says it
                self.get_logger().error(f"configure failed: {error}")
            return TransitionCallbackReturn.FAILURE
        self.perception_pub = self.create_lifecycle_publisher(PerceptionDescription, "owled/perception", 10)
        self.action_pub = self.create_lifecycle_publisher(PredictedAction, "owled/action", 10)
        self.answer_pub = self.create_lifecycle_publisher(QAAnswer, "owled/answers", 10)
        if self.annotate:
            self.annotated_pub = self.create_lifecycle_publisher(Image, "owled/annotated", 1)
            self.markers_pub = self.create_lifecycle_publisher(MarkerArray, "owled/markers", 1)
        return super().on_configure(state)

    def load(self):
        import torch

        from owled_ros.model import load_model
        from owled_ros.model.checkpoint import keep_heap_small
        from owled_ros.model.sparse_kernels import to_semi_structured
        from owled_ros.runtime import prepare

        param = lambda name: self.get_parameter(name).value
        started = time.perf_counter()
        keep_heap_small()
        self.model = load_model(param("model_dir")).to(param("device"), getattr(torch, param("dtype")))
        unknown = [name for _, name, _ in self.camera_config if name not in (self.model.cameras or [name])]
        if unknown:
            raise ValueError(f"camera_names {unknown} are not views of model {self.model.model_id} "
                             f"(it knows {self.model.cameras})")
        threads = param("inference_threads") or max(1, len(os.sched_getaffinity(0)) - 1)
        self.backend = "torch" if param("device") != "cpu" else prepare(
            self.model, param("backend"), param("dtype"), threads, warn=self.get_logger().warning, serve_only=True)
        compression = self.model.compression
        nm = compression.get("nm") or [0, 0]
        self.model_info = ModelInfo(model_id=self.model.model_id, method=compression["method"],
                                    sparsity=float(compression["sparsity"]), nm_n=nm[0], nm_m=nm[1])
        self.sparse_linears = []
        if param("sparse_kernels") and list(nm) == [2, 4] and param("device").startswith("cuda"):
            if param("dtype") == "bfloat16":
                self.sparse_linears = to_semi_structured(self.model)
            else:
                self.get_logger().warning("a 2:4 model on CUDA runs dense in float32; dtype bfloat16 uses the sparse kernels")
        loaded = time.perf_counter()
        self.warm_up()
        self.get_logger().info(f"model {self.model_info.model_id} ({self.model_info.method}, sparsity "
                               f"{self.model_info.sparsity:.3f}) loaded in {loaded - started:.1f} s, warmed up in "
                               f"{time.perf_counter() - loaded:.1f} s; runtime backend: {self.backend} "
                               f"({param('dtype')}, {threads} inference threads)")

    def warm_up(self):
        """Both questions about one blank frame set, answers discarded: a runtime allocates its buffers at its
        first inferences (0.3 s more for the first frame set with OpenVINO on 2 cores), which no camera's frame
        should wait for. A model that fails here is still served: each frame set then reports its failure."""
        blank = {name: np.zeros((64, 64, 3), np.uint8) for _, name, _ in self.camera_config}
        try:
            self.model.answer([blank, blank], [self.perception_question, self.action_question], self.max_new_tokens,
                              draft_tokens=0)
        except Exception as error:  # noqa: BLE001 -- reported per frame set on /diagnostics once active
            self.get_logger().warning(f"warm-up answer failed ({type(error).__name__}: {error})")

    def on_activate(self, state):
        """Subscribe to the cameras and questions, offer owled/ask, start the worker."""
        self.reset()
        self.cameras = CameraInput(self, self.slot.put, self.camera_config)
        self.question_sub = self.create_subscription(Question, "owled/questions", self.on_question, 10)
        self.ask_service = self.create_service(Ask, "owled/ask", self.on_ask)
        self.running = True
        self.worker = threading.Thread(target=self.work, daemon=True)
        self.worker.start()
        self.get_logger().info(f"active on cameras {[c for _, c, _ in self.camera_config]}")
        return super().on_activate(state)

    def on_deactivate(self, state):
        """Stop taking frames and questions (an inference in progress finishes and publishes); the model stays."""
        self.stop_serving()
        return super().on_deactivate(state)

    def stop_serving(self):
        if self.worker is None:
            return
        self.cameras.close()
        self.destroy_subscription(self.question_sub)
        self.destroy_service(self.ask_service)
        self.running = False
        self.worker.join(timeout=120)
        self.worker = None
        while self.asks:
            self.asks.popleft()[1].set_exception(RuntimeError("the node stopped serving before answering"))
        self.wake_executor()

    def on_cleanup(self, state):
        """Free the model (and its compiled runtime)."""
        for name in ("perception_pub", "action_pub", "answer_pub", "annotated_pub", "markers_pub"):
            if hasattr(self, name):
                self.destroy_lifecycle_publisher(getattr(self, name))
                delattr(self, name)
        self.model = None
        gc.collect()
        return TransitionCallbackReturn.SUCCESS

    def on_shutdown(self, state):
        self.stop_serving()
        return TransitionCallbackReturn.SUCCESS

    # ----- inference (worker thread) -----
    def infer(self, frame_set, questions, timing=None, confidences=None):
        """The questions about one frame set: its images are encoded once, the shared prompt head run once.
        confidences: a list that receives each answer's (DrivingVLM.answer)."""
        with self.model_lock:
            start = self.get_clock().now()  # latencies on the node's clock: /clock with use_sim_time
            answers = self.model.answer([frame_set.images] * len(questions), questions, self.max_new_tokens, timing,
                                        self.history, self.draft_tokens, confidences)
            for question, answer in zip(questions, answers):
                earlier = self.history.pop(question, None) or collections.deque(maxlen=self.draft_history)
                earlier.append(answer)
                self.history[question] = earlier
                if len(self.history) > HISTORY_QUESTIONS:
                    del self.history[next(iter(self.history))]
            return answers, (self.get_clock().now() - start).nanoseconds / 1e9

    def work(self):
        """Frame sets and queued questions take turns: one question at most between two frame sets, so a
        flood of questions never starves the cameras. An error is reported and the worker goes on."""
        while self.running:
            frame_set = self.slot.take(timeout=0.2)
            if frame_set is not None:
                started = time.monotonic()
                self.guarded(self.process, frame_set)
                self.latest = frame_set
                time.sleep(max(0.0, self.min_period - (time.monotonic() - started)))
            if self.asks and self.latest is not None:
                self.guarded(self.answer_ask, self.asks.popleft())
            elif self.questions and self.latest is not None:
                self.guarded(self.answer_question, self.questions.popleft())

    def guarded(self, step, item):
        """Run one worker step; diagnostics stay ERROR, with the message, until a later step succeeds."""
        try:
            step(item)
            self.failing = False
        except Exception as error:  # noqa: BLE001 -- any failure must reach diagnostics, not kill the worker
            self.counts["worker_errors"] += 1
            self.failing, self.last_error = True, f"{type(error).__name__}: {error}"
            self.get_logger().error(f"{step.__name__} failed: {self.last_error}", throttle_duration_sec=5.0)

    def header(self, frame_set):
        return Header(stamp=stamp_msg(frame_set.stamp_ns), frame_id=self.frame_id)

    def process(self, frame_set):
        timing = {k: v for k, v in frame_set.timing.items() if k != "ready"}
        timing["queue_s"] = time.monotonic() - frame_set.timing.get("ready", time.monotonic())
        confidences = []
        (description, action_text), latency = self.infer(frame_set, [self.perception_question, self.action_question],
                                                         timing, confidences)
        self.latencies.append(latency)
        self.processed += 1
        started = time.perf_counter()
        perception = self.perception_message(frame_set, description, latency, confidences[0])
        action = self.action_message(frame_set, action_text, latency, confidences[1])
        self.perception_pub.publish(perception)
        self.action_pub.publish(action)
        if self.annotate:
            self.publish_annotations(frame_set, perception, action)
        timing["publish_s"] = time.perf_counter() - started
        steps, tokens = timing.pop("decode_steps", 0), timing.pop("decode_tokens", 0)
        if steps:
            timing["decode_per_step_s"] = timing["decode_s"] / steps
            timing["tokens_per_step"] = (tokens - 1) / steps  # the first token comes out of the prefill
        for stage, seconds in timing.items():
            self.stages[stage].append(seconds)

    def publish_annotations(self, frame_set, perception, action):
        """The first camera's view with the answers drawn, and RViz text markers over the vehicle."""
        light = next((o.state for o in perception.objects if o.label == "traffic_light"), "none")
        colour = ACTION_COLOURS.get(action.action_label, (255, 255, 255))
        lines = [(f"action: {action.action_label} ({action.confidence:.2f})", colour),
                 (f"light: {light}", LIGHT_COLOURS.get(light, (255, 255, 255))), (perception.description[:90], (255, 255, 255))]
        camera = next(iter(frame_set.images))
        view = draw_answers(frame_set.images[camera], lines)
        header = self.header(frame_set)
        self.annotated_pub.publish(Image(header=Header(stamp=header.stamp, frame_id=frame_set.frame_id or camera),
                                         height=view.shape[0], width=view.shape[1], encoding="rgb8",
                                         step=view.shape[1] * 3, data=view.tobytes()))
        markers = [Marker(header=header, ns="owled", id=i, type=Marker.TEXT_VIEW_FACING, action=Marker.ADD,
                          pose=Pose(position=Point(x=0.0, y=0.0, z=2.5 + 0.6 * i), orientation=Quaternion(w=1.0)),
                          scale=Vector3(z=0.5), color=ColorRGBA(r=c[0] / 255, g=c[1] / 255, b=c[2] / 255, a=1.0),
                          text=text, lifetime=Duration(sec=2))
                   for i, (text, c) in enumerate(lines[:2])]
        self.markers_pub.publish(MarkerArray(markers=markers))

    def perception_message(self, frame_set, description, latency, confidence):
        parsed = parse_description(description)
        if all(value is None for value in parsed.values()):
            self.counts["unparsed_answers"] += 1  # published as text, with no objects
        objects = [ObjectDescription(label=label)
                   for label, key in (("vehicle", "n_cars"), ("pedestrian", "n_pedestrians")) for _ in range(parsed[key] or 0)]
        if parsed["light"] not in (None, "none"):
            objects.append(ObjectDescription(label="traffic_light", state=parsed["light"]))
        return PerceptionDescription(header=self.header(frame_set), description=description, confidence=confidence,
                                     objects=objects, cameras_used=list(frame_set.images),
                                     cameras_missing=frame_set.missing, model=self.model_info, latency_s=latency)

    def action_message(self, frame_set, text, latency, confidence):
        action = parse_action(text)
        speed = parse_speed(text)
        if action == "unknown":
            self.counts["unparsed_answers"] += 1
        return PredictedAction(header=self.header(frame_set), action=ACTION_CODES.get(action, PredictedAction.ACTION_UNKNOWN),
                               action_label=action, rationale=text, confidence=confidence,
                               has_target_speed=speed is not None, target_speed_mps=speed or 0.0,
                               model=self.model_info, latency_s=latency)

    # ----- questions -----
    def refused(self, question):
        """Why a question is not answered, or None."""
        if len(question.question) > self.max_question_chars:
            self.counts["refused_questions"] += 1
            return f"question of {len(question.question)} characters is over max_question_chars ({self.max_question_chars})"
        return None

    def on_question(self, msg):
        reason = self.refused(msg)
        if reason:
            self.get_logger().warning(f"question {msg.question_id!r} refused: {reason}", throttle_duration_sec=2.0)
            return
        if len(self.questions) == self.questions.maxlen:
            self.counts["dropped_questions"] += 1
            self.get_logger().warning("question queue full; dropping the oldest question", throttle_duration_sec=2.0)
        self.questions.append(msg)

    def answer_question(self, question):
        frame_set, confidences = self.latest, []
        (answer,), latency = self.infer(frame_set, [question.question], confidences=confidences)
        message = QAAnswer(header=self.header(frame_set), question_id=question.question_id or uuid.uuid4().hex[:8],
                           category=question.category, question=question.question, answer=answer,
                           confidence=confidences[0], model=self.model_info, latency_s=latency)
        self.answer_pub.publish(message)
        return message

    def answer_ask(self, item):
        request, answered = item
        try:
            answered.set_result(self.answer_question(request))
        except Exception as error:
            answered.set_exception(error)
            raise  # to diagnostics too
        finally:
            self.wake_executor()

    def wake_executor(self):
        """Resume the service calls whose answers are in (the executor checks its pending tasks when woken)."""
        if self.executor is not None:
            self.executor.wake()

    async def on_ask(self, request, response):
        """Queued for the worker and awaited: the executor goes on receiving frames meanwhile."""
        reason = "no frame set received yet" if self.latest is None else self.refused(request)
        if reason:
            response.success, response.message = False, reason
            return response
        answered = Future()
        self.asks.append((request, answered))
        try:
            response.answer = await answered
        except Exception as error:  # noqa: BLE001 -- the caller gets the failure, the node goes on
            response.success, response.message = False, f"{type(error).__name__}: {error}"
            return response
        response.success, response.message = True, "ok"
        return response

    # ----- diagnostics -----
    def stats(self):
        """The counts of this activation, the stage p50s and the model; the lifecycle state alone before the
        node is configured."""
        state = {"state": self._state_machine.current_state[1]}
        if self.model is None:
            return state
        latencies = np.array(self.latencies) if self.latencies else np.array([math.nan])
        cameras = self.cameras.stats() if self.cameras else {}  # the latest activation's
        return {**state, "processed_frame_sets": self.processed, "dropped_frame_sets": self.slot.dropped, **cameras,
                "dropped_questions": self.counts["dropped_questions"], "refused_questions": self.counts["refused_questions"],
                "worker_errors": self.counts["worker_errors"], "last_error": self.last_error,
                "unparsed_answers": self.counts["unparsed_answers"],
                "latency_p50_s": float(np.percentile(latencies, 50)), "latency_p95_s": float(np.percentile(latencies, 95)),
                **{f"p50_s.{stage}": float(np.percentile(values, 50)) for stage, values in sorted(self.stages.items())},
                "model_id": self.model_info.model_id, "method": self.model_info.method, "backend": self.backend,
                "sparse_kernel_linears": len(self.sparse_linears),
                "sparsity": round(self.model_info.sparsity, 4)}

    def health(self, stats):
        """(level, message), as diagnostic_updater's conventions have it: ERROR while the worker fails, STALE
        when no frame set came for stale_after_s, WARN for a model p50 over its latency budget, missing cameras
        or answers not parsed since the last status; OK otherwise."""
        if self.failing:
            return DiagnosticStatus.ERROR, self.last_error
        if self.worker is None:  # not active: no frames expected
            return DiagnosticStatus.OK, f"{stats['state']}{': ' + self.configure_error if self.configure_error else ''}"
        since = time.monotonic() - (self.cameras.last_set or self.started)
        if since > self.stale_after_s:
            return DiagnosticStatus.STALE, f"no frame set for {since:.1f} s"
        unparsed, self.unparsed_reported = self.counts["unparsed_answers"] - self.unparsed_reported, self.counts["unparsed_answers"]
        warnings = [f"model p50 {stats['latency_p50_s']:.2f} s over the {self.latency_budget_s:g} s budget"
                    if stats["latency_p50_s"] > self.latency_budget_s else "",
                    f"cameras missing: {stats['missing_cameras']}" if stats["missing_cameras"] else "",
                    f"{unparsed} answers not parsed" if unparsed else ""]
        if any(warnings):
            return DiagnosticStatus.WARN, "; ".join(w for w in warnings if w)
        return DiagnosticStatus.OK, f"{stats['processed_frame_sets']} processed, {stats['dropped_frame_sets']} dropped"

    def publish_diagnostics(self):
        stats = self.stats()
        level, message = self.health(stats)
        status = DiagnosticStatus(level=level, name="owled_drive", hardware_id=stats.get("model_id", ""), message=message,
                                  values=[KeyValue(key=k, value=str(v)) for k, v in stats.items()])
        self.diagnostics_pub.publish(DiagnosticArray(header=Header(stamp=self.get_clock().now().to_msg()), status=[status]))
        self.get_logger().info(" ".join(f"{k}={v}" for k, v in stats.items() if "." not in k), throttle_duration_sec=10.0)

    def destroy_node(self):
        self.stop_serving()  # an inference in progress finishes and publishes
        super().destroy_node()


def spin(node_class):
    """Run a node until SIGINT/SIGTERM with a single-threaded executor (rclpy's multi-threaded one took 22 ms
    more to hand six 800x450 views to their callbacks on 2 cores: 29 against 7.7 ms; nothing the executor runs
    waits for inference). A bad parameter or model stops it at start-up with one line and exit code 2."""
    # Our own SIGINT/SIGTERM handling instead of rclpy's, which invalidates the context at once (an inference
    # in progress could not publish its result during the teardown below), and instead of KeyboardInterrupt,
    # which can land inside the executor while it holds a lock that the teardown then waits for.
    stop = threading.Event()
    for sig in (signal.SIGINT, signal.SIGTERM):
        signal.signal(sig, lambda *_: stop.set())
    rclpy.init(signal_handler_options=SignalHandlerOptions.NO)
    try:
        node = node_class()
        if isinstance(node, LifecycleNode) and node.get_parameter("autostart").value:
            if node.trigger_configure() != TransitionCallbackReturn.SUCCESS:
                raise ValueError(node.configure_error)
            node.trigger_activate()
    except (ValueError, OSError) as error:
        print(f"{node_class.__name__}: error: {error}", file=sys.stderr, flush=True)
        os._exit(2)  # nothing to keep: rclpy's teardown would call destroy_node on the half-built node
    executor = SingleThreadedExecutor()
    executor.add_node(node)
    try:
        while not stop.is_set():
            executor.spin_once(timeout_sec=0.1)
    except ExternalShutdownException:
        pass
    finally:
        # Ctrl-C on `ros2 launch` reaches the node twice (the terminal's process group, then launch):
        # the second must not cut short the teardown that lets a running inference publish.
        for sig in (signal.SIGINT, signal.SIGTERM):
            signal.signal(sig, signal.SIG_IGN)
        executor.shutdown()
        node.destroy_node()
        rclpy.try_shutdown()
    # Everything is published and closed; the interpreter's own teardown (freeing torch's and OpenVINO's
    # modules) would take about 2 s more. An error above propagates instead, with its traceback and exit code.
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(0)


def main():
    spin(DriveNode)


if __name__ == "__main__":
    main()
