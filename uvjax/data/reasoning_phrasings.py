"""The phrasings of the reasoning records (our own, several per shape): ``reasoning.py`` draws from them.
``{c}``/``{d}``/``{k}``... are filled with corners, durations and points."""
from __future__ import annotations

GEN_PREFIXES = ("Draw a smartwatch", "Generate a picture of a smart watch", "Show me a watch face")
TIME_FRAMES = ("whose hands show the time", "set to the time", "reading the time")
WEATHER_CLUES = {
    "sunny": ("weather that calls for sunglasses", "a clear blue sky", "a perfect beach day"),
    "cloudy": ("an overcast sky", "a grey, dull day", "a day when clouds hide the sun"),
    "raining": ("the weather that needs an umbrella", "wet weather", "a day that calls for a raincoat"),
}
WEATHER_FRAMES = (", with the weather icon for {c}", ", forecasting {c}", ", its weather symbol showing {c}")
RELATION_TEXT = {"right": "to its right", "left": "to its left", "below": "directly below it",
                 "above": "directly above it", "diagonal": "diagonally opposite it"}
POSITION_FRAMES = (", the {a} in the {ca} corner and the {b} {rel}",
                   ", placing the {a} at the {ca} corner with the {b} {rel}")
RATIONALE_OPENERS = ("Let me work out the details.", "Reasoning step by step:",
                     "First I derive each attribute.")
SUMMARY_LEADS = ("So the watch shows", "Putting it together, the watch shows",
                 "Therefore I draw a watch showing")

EDIT_INSTRUCTIONS = {
    "move_battery": ("Move the battery to the {c} corner.", "Put the battery indicator in the {c} "
                     "corner instead.", "Relocate the charge display to the {c} corner."),
    "move_weather": ("Move the weather icon to the {c} corner.", "Put the weather symbol in the {c} "
                     "corner instead.", "Relocate the forecast display to the {c} corner."),
    "weather_raining": ("It starts raining.", "A rain shower begins.", "Change the forecast to rain."),
    "weather_sunny": ("The clouds clear and the sun comes out.", "Make it a sunny day.",
                      "Switch the forecast to sunshine."),
    "weather_cloudy": ("Clouds roll in, but it stays dry.", "Make the sky overcast.",
                       "Change the forecast to cloudy."),
    "time_forward": ("Set the watch forward by {d}.", "Show the time {d} later.",
                     "Advance the hands by {d}."),
    "time_back": ("Turn the hands back by {d}.", "Show the time {d} earlier.",
                  "Set the watch back by {d}."),
    "battery_drain": ("The battery drains by {k} points.", "Use up {k} points of charge.",
                      "Let the charge drop by {k} points."),
    "battery_charge": ("Charge the watch by {k} points.", "Add {k} points of charge.",
                       "Top the battery up by {k} points."),
}
EDIT_CLOSINGS = ("Everything else stays as it is.", "The other elements do not change.",
                 "Nothing else on the watch changes.")

DESCRIPTIONS = (
    "The watch should read {time}, show {weather} weather in the {wp} corner and a battery at {b} in "
    "the {bp} corner.",
    "Expected: {time} on the dial, a {weather} icon at the {wp} corner and {b} charge shown at the "
    "{bp} corner.",
    "This smartwatch is meant to display {time}, {weather} weather (icon in the {wp} corner) and "
    "{b} battery (in the {bp} corner).",
)
CORRECT_ASKS = ("Does the watch match the description? Fix what is wrong.",
                "Correct the watch so that it matches.",
                "Check the picture against the description and repair it.")
CORRECT_CLOSINGS = ("Here is the corrected watch.", "This is the watch fixed to match.",
                    "The repaired watch follows.")

MM_QUESTIONS = {
    "future": ("What will the watch show {d} from now?", "Where will the hands point {d} later?",
               "Picture this watch {d} from now: what time will it read?"),
    "past": ("What time did the watch show {d} ago?", "Rewind the watch by {d}: what time does it show?",
             "Imagine the watch {d} earlier. What time was it?"),
    "drain": ("The battery loses {k} points every hour. What will it read {d} from now?",
              "Charge drops by {k} points per hour; what is the battery level after {d}?",
              "If the watch uses {k} points of charge an hour, how much is left {d} later?"),
}
MM_BRIDGES = ("Let me draw that moment.", "Here is how the watch will look.", "Visualising it:")
