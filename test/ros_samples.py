"""Sample owled_ros messages with every field set, shared by the two processes of the round-trip test."""
from builtin_interfaces.msg import Time
from std_msgs.msg import Header

from owled_ros.msg import ModelInfo, ObjectDescription, PerceptionDescription, PredictedAction, QAAnswer, Question


def header():
    return Header(stamp=Time(sec=1700000123, nanosec=456000000), frame_id="CAM_FRONT")


def model():
    return ModelInfo(model_id="owled-smollm2-135m/owled-0.50", method="owled", sparsity=0.5, nm_n=2, nm_m=4)


def objects():
    return [ObjectDescription(label="vehicle"), ObjectDescription(label="traffic_light", state="red")]


def samples():
    """Topic name -> (message type, message)."""
    return {
        "model_info": (ModelInfo, model()),
        "object": (ObjectDescription, objects()[0]),
        "perception": (PerceptionDescription, PerceptionDescription(
            header=header(), description="A car ahead, red light to the front-left.", confidence=0.625, objects=objects(),
            cameras_used=["CAM_FRONT", "CAM_FRONT_LEFT"], cameras_missing=["CAM_BACK"], model=model(),
            latency_s=0.25)),
        "action": (PredictedAction, PredictedAction(
            header=header(), action=PredictedAction.ACTION_STOP, action_label="stop",
            rationale="The light is red.", confidence=0.75, has_target_speed=True, target_speed_mps=0.0,
            model=model(), latency_s=0.125)),
        "question": (Question, Question(header=header(), question_id="q-7", category="planning",
                                        question="What should the ego vehicle do?")),
        "answer": (QAAnswer, QAAnswer(header=header(), question_id="q-7", category="planning",
                                      question="What should the ego vehicle do?", answer="Stop.", confidence=0.875,
                                      model=model(), latency_s=0.5)),
    }
