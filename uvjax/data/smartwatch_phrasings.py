"""The Smart Watch dataset's phrasings (our own; the reference notebook's counts): VQA questions per
attribute, caption / generation sentence fragments, prefixes, caption questions and generation answers.
``smartwatch.py`` draws from them."""
from __future__ import annotations

QUESTIONS: dict[str, tuple[str, ...]] = {
    "weather": (
        "What weather does the watch show?",
        "Which weather condition is displayed on this watch face?",
        "What does the weather icon on the watch indicate?",
        "Tell me the weather shown on the smartwatch.",
        "According to the watch, what is the weather like?",
        "Which forecast symbol appears on the screen?",
        "What kind of weather is indicated on the display?",
        "Identify the weather the watch is reporting.",
        "Is the display showing sunny, cloudy or raining weather?",
    ),
    "time": (
        "What time is it on the watch?",
        "What time does the watch face show?",
        "Read the time from the clock hands.",
        "Which time is displayed on this smartwatch?",
        "Tell me the time shown on the watch.",
        "What time do the hands point to?",
        "According to the watch, what is the current time?",
        "Give the time indicated by the watch.",
        "What is the time on the display?",
        "Read the clock on this watch.",
    ),
    "battery": (
        "How much battery is left?",
        "What battery level does the watch show?",
        "What is the charge percentage on the watch?",
        "How charged is the smartwatch?",
        "Tell me the remaining battery percentage.",
        "What percentage does the battery indicator read?",
        "How full is the battery of the watch?",
        "Read the battery level from the screen.",
        "What does the power indicator say?",
        "How much charge remains according to the display?",
    ),
    "battery_pos": (
        "In which corner is the battery indicator?",
        "Where on the screen is the battery shown?",
        "Which corner holds the battery level?",
        "Where is the battery icon located?",
        "Tell me the corner where the charge indicator sits.",
        "In what corner of the display is the power level?",
        "Where does the watch place its battery bar?",
        "Locate the battery indicator: which corner is it in?",
        "Which part of the screen shows the battery?",
        "Where can I find the battery percentage on the watch?",
    ),
    "weather_pos": (
        "In which corner is the weather icon?",
        "Where on the screen is the weather shown?",
        "Which corner holds the weather symbol?",
        "Where is the weather indicator located?",
        "Tell me the corner where the forecast icon sits.",
        "In what corner of the display is the weather?",
        "Where does the watch place its weather symbol?",
        "Locate the weather icon: which corner is it in?",
        "Which part of the screen shows the weather?",
        "Where can I find the weather on the watch?",
    ),
}
FRAGMENTS: dict[str, tuple[str, ...]] = {
    "time": (", the time reads {v}", ", showing {v} on its dial", ", with its hands at {v}",
             ", displaying the time {v}"),
    "weather": (", the weather is {v}", ", with a {v} weather icon", ", forecasting {v} weather"),
    "battery": (", battery at {v}", ", with {v} charge left", ", the power level reads {v}"),
    "weather_pos": (", the weather icon sits in the {v} corner", ", weather shown at the {v}",
                    ", with the forecast symbol placed {v}"),
    "battery_pos": (", the battery is in the {v} corner", ", battery indicator at the {v}",
                    ", with the charge level placed {v}"),
}
CAPTION_PREFIXES = ("This image shows a smartwatch", "Pictured is a smart watch",
                    "The picture contains a smartwatch face")
GENERATION_PREFIXES = ("Generate an image of a smart watch", "Draw a smartwatch",
                       "Show me a picture of a smart watch")
CAPTION_QUESTIONS = (
    "Describe the watch in this image.",
    "What are the main elements of this smartwatch display?",
    "Give a short description of the watch face and its layout.",
    "Explain what the smartwatch screen shows.",
    "Summarise the information visible on this watch.",
    "What can you see on this watch face?",
    "Describe the layout and readings of the smartwatch.",
    "Write a caption for this smartwatch picture.",
    "List what the watch display contains.",
    "Provide a description of this watch, including where things are.",
)
GENERATION_ANSWERS = ("Here is the image.", "Sure, here is the watch.",
                      "This is the smart watch you asked for.")
