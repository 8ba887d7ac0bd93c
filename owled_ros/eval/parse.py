"""Documented parsers from free-text answers to structured values (used by the drive node and evaluation).

- Counts: "<number or number word> vehicle(s)/car(s)/truck(s)" and "... pedestrian(s)/people/cyclist(s)";
  "no vehicles" counts 0; absent mention -> None (not parsed).
- Traffic light: the first of red/yellow/amber/green within "traffic light ... is <state>" or
  "<state> (traffic) light"; "no traffic light" -> "none"; otherwise None.
- Action: the first action phrase in the answer (stop, slow down/brake, change lane (left/right),
  turn left/right, accelerate, keep lane/go straight/continue); otherwise "unknown".
- Speed: "<number> m/s" or "<number> km/h" (converted to m/s); otherwise None.
"""
import re

WORDS = {"no": 0, "zero": 0, "one": 1, "a": 1, "an": 1, "two": 2, "three": 3, "four": 4, "five": 5, "six": 6,
         "seven": 7, "eight": 8, "nine": 9, "ten": 10}
NUMBER = r"(\d+|" + "|".join(WORDS) + r")"
VEHICLE = r"(?:vehicles?|cars?|trucks?)"
PEDESTRIAN = r"(?:pedestrians?|people|persons?|cyclists?)"
ACTION_PATTERNS = [
    ("stop", r"\bstop"), ("slow_down", r"\bslow(?:ing)? down|\bbrak"),
    ("change_lane_left", r"change (?:to the )?(?:lane )?(?:to the )?left|lane to the left|left lane"),
    ("change_lane_right", r"change (?:to the )?(?:lane )?(?:to the )?right|lane to the right|right lane"),
    ("turn_left", r"turn(?:ing)? left"), ("turn_right", r"turn(?:ing)? right"), ("accelerate", r"accelerat|speed up"),
    ("keep_lane", r"keep(?:ing)? (?:the )?lane|go(?:ing)? straight|continue|steady speed|maintain"),
]


def _number(token):
    return int(token) if token.isdigit() else WORDS[token]


def parse_count(text, noun):
    match = re.search(NUMBER + r"\s+(?:\w+\s+)?" + noun + r"\b", text.lower())
    return None if match is None else _number(match.group(1))


def parse_light(text):
    text = text.lower()
    if re.search(r"\bno traffic lights?\b", text):
        return "none"
    match = re.search(r"traffic light[^.]*?\b(red|yellow|amber|green)\b|\b(red|yellow|amber|green) (?:traffic )?light", text)
    if match is None:
        return None
    state = match.group(1) or match.group(2)
    return "yellow" if state == "amber" else state


def parse_action(text):
    text = text.lower()
    found = [(m.start(), action) for action, pattern in ACTION_PATTERNS for m in [re.search(pattern, text)] if m]
    return min(found)[1] if found else "unknown"


def parse_speed(text):
    match = re.search(r"(\d+(?:\.\d+)?)\s*(m/s|km/h)", text.lower())
    if match is None:
        return None
    value = float(match.group(1))
    return value / 3.6 if match.group(2) == "km/h" else value


def parse_description(text):
    return {"n_cars": parse_count(text, VEHICLE), "n_pedestrians": parse_count(text, PEDESTRIAN),
            "light": parse_light(text)}
