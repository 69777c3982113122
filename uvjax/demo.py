"""``python -m uvjax.demo --workdir=RUN [--host=127.0.0.1] [--port=7860]``: a browser demo of a trained model.

RUN is a run directory or an export directory (anything :func:`uvjax.api.load` reads). The model is loaded once;
the page (Gradio, as Janus, LlamaGen and Show-o ship theirs) then serves requests one at a time on three tabs:

* **Ask about an image**: upload an image, ask a question → the answer (``run.answer``).
* **Draw**: a prompt → images (``run.generate``: number of images, CFG scale, temperature, seed).
* **Chat**: a prompt and an optional image → the interleaved answer, text and images in the order the model
  wrote them (``run.chat``; each turn is answered on its own: the model sees no earlier turns).

Every tab calls the same :class:`uvjax.api.Model` method a notebook would, with the same arguments, so the page
shows exactly what the API returns for that seed. Nothing leaves the machine: no share link (``--share`` is off
by default and needs the network), Gradio's analytics and version check are off (``GRADIO_ANALYTICS_ENABLED``),
and the default theme's fonts are served by the app itself. ``--port=0`` picks a free port.
"""
from __future__ import annotations

import html
import os
import socket
import sys
from typing import TYPE_CHECKING

# Before gradio is imported anywhere: no analytics / version-check requests (gradio.analytics reads these), no
# Hugging Face telemetry. A user who wants them can still set the variables.
os.environ.setdefault("GRADIO_ANALYTICS_ENABLED", "False")
os.environ.setdefault("HF_HUB_DISABLE_TELEMETRY", "1")

import logging

from absl import app, flags  # noqa: E402

from uvjax.api import load

if TYPE_CHECKING:
    import gradio as gr

# The demo's own flag set: the other commands define --workdir on absl's global FLAGS (uvjax/cli.py), and a test
# process imports several of them, so the demo keeps its flags apart. Parsed by `parse_flags` below; absl's own flags
# (--verbosity, ...) still go to the global set.
FLAGS = flags.FlagValues()
flags.DEFINE_string("workdir", None, "run directory or export directory to serve", flag_values=FLAGS)
flags.DEFINE_integer("step", None, "checkpoint step (default: the latest)", flag_values=FLAGS)
flags.DEFINE_string("host", "127.0.0.1", "address to listen on (0.0.0.0: every interface)", flag_values=FLAGS)
flags.DEFINE_integer("port", 7860, "port to listen on (0: a free one)", flag_values=FLAGS)
flags.DEFINE_bool("share", False, "also open a public gradio.live link (needs the network)", flag_values=FLAGS)
flags.mark_flag_as_required("workdir", flag_values=FLAGS)

MAX_IMAGES = 8  # the Draw tab's slider: one decoding call draws them all as a batch


def _gradio():
    try:
        import gradio as gr
    except ImportError as e:
        raise ImportError(f"the demo needs gradio ({e}); install it with: pip install -e '.[demo]'") from None
    return gr


def _check(run, what: str):
    """Requests a model cannot serve say why on the page (gr.Error) instead of a stack trace in the log."""
    gr = _gradio()
    if what == "image_in" and not run.image_size:
        raise gr.Error(f"{html.escape(run.path)}: this model has no image tokenizer, so it cannot read images")
    if what == "image_out" and not run.can_generate:
        raise gr.Error(f"{html.escape(run.path)}: this model cannot draw images (no VQ decoder, or continuous outputs)")


def _call(fn, *args, **kw):
    gr = _gradio()
    try:
        return fn(*args, **kw)
    except ValueError as e:  # the API's bad-input errors (they name the input and what was expected)
        raise gr.Error(html.escape(str(e), quote=False)) from e  # the toast reads HTML; this is text


def _text(s: str) -> dict:
    """A chat message shown verbatim: the Chatbot treats text as HTML (and a bare string gets dedented), but a
    model's text is plain text, `<s>` and all."""
    return {"type": "text", "text": html.escape(s, quote=False)}


def build_app(run) -> "gr.Blocks":
    """The three-tab page for a loaded :class:`uvjax.api.Model`; ``.launch()`` it (see :func:`launch`).

    Every event shares one concurrency slot: the model (and JAX's compiled functions) serve one request at a
    time, queued in arrival order."""
    gr = _gradio()
    one = dict(concurrency_limit=1, concurrency_id="model")
    title = f"uvjax: {os.path.basename(os.path.normpath(run.path)) or run.path}"
    with gr.Blocks(title=title, analytics_enabled=False) as demo:
        gr.Markdown(f"## {title}\n`{run.path}` (step {run.step}; images {run.image_size or 'none'} px; "
                    f"{'draws images' if run.can_generate else 'does not draw images'})")
        with gr.Tab("Ask about an image", id="ask"):
            with gr.Row():
                with gr.Column():
                    # image_mode=None: the API converts (alpha over white, as training did), not gradio
                    ask_image = gr.Image(type="pil", image_mode=None, sources=["upload", "clipboard"],
                                         label="Image", elem_id="ask_image")
                    ask_question = gr.Textbox(label="Question", elem_id="ask_question")
                    with gr.Accordion("Decoding", open=False, elem_id="ask_decoding"):
                        ask_tokens = gr.Slider(1, 512, value=64, step=1, label="Max new tokens",
                                               elem_id="ask_tokens")
                        ask_temp = gr.Slider(0.0, 2.0, value=0.0, step=0.05, label="Temperature (0 = greedy)",
                                             elem_id="ask_temperature")
                        ask_seed = gr.Number(0, precision=0, label="Seed", elem_id="ask_seed")
                    ask_button = gr.Button("Answer", variant="primary", elem_id="ask_submit")
                ask_answer = gr.Textbox(label="Answer", lines=4, interactive=False, elem_id="ask_answer")

        def answer(image, question, max_new_tokens, temperature, seed):
            _check(run, "image_in")
            if image is None:
                raise gr.Error("upload an image first")
            return _call(run.answer, image, question or "", max_new_tokens=int(max_new_tokens),
                         temperature=float(temperature), seed=int(seed or 0))

        ask_inputs = [ask_image, ask_question, ask_tokens, ask_temp, ask_seed]
        ask_button.click(answer, ask_inputs, ask_answer, **one)
        ask_question.submit(answer, ask_inputs, ask_answer, **one)

        with gr.Tab("Draw", id="draw"):
            with gr.Row():
                with gr.Column():
                    draw_prompt = gr.Textbox(label="Prompt", elem_id="draw_prompt")
                    draw_n = gr.Slider(1, MAX_IMAGES, value=4, step=1, label="Number of images", elem_id="draw_n")
                    draw_cfg = gr.Slider(0.0, 10.0, value=0.0, step=0.5,
                                         label="CFG scale (logits = cond + s (cond - uncond); 0 = off)",
                                         elem_id="draw_cfg")
                    draw_temp = gr.Slider(0.0, 2.0, value=1.0, step=0.05, label="Temperature (0 = greedy)",
                                          elem_id="draw_temperature")
                    draw_seed = gr.Number(0, precision=0, label="Seed", elem_id="draw_seed")
                    draw_button = gr.Button("Draw", variant="primary", elem_id="draw_submit")
                # format="png": lossless, so the page shows the decoder's exact pixels (gradio's default is webp)
                draw_gallery = gr.Gallery(label="Images", format="png", columns=4, elem_id="draw_gallery")

        def draw(prompt, n, cfg_scale, temperature, seed):
            _check(run, "image_out")
            return _call(run.generate, prompt or "", n=int(n), cfg_scale=float(cfg_scale),
                         temperature=float(temperature), seed=int(seed or 0))

        draw_inputs = [draw_prompt, draw_n, draw_cfg, draw_temp, draw_seed]
        draw_button.click(draw, draw_inputs, draw_gallery, **one)
        draw_prompt.submit(draw, draw_inputs, draw_gallery, **one)

        with gr.Tab("Chat", id="chat"):
            # the model writes plain text: shown as is (markdown would eat *, _, <s>, ...)
            chat_box = gr.Chatbot(label="Conversation", height=480, render_markdown=False, elem_id="chat_box")
            with gr.Row():
                chat_prompt = gr.Textbox(label="Message", scale=4, elem_id="chat_prompt")
                chat_image = gr.Image(type="pil", image_mode=None, sources=["upload", "clipboard"],
                                      label="Image (optional)", height=160, scale=1, elem_id="chat_image")
            with gr.Accordion("Decoding", open=False, elem_id="chat_decoding"):
                chat_tokens = gr.Slider(1, 512, value=256, step=1, label="Max new text tokens", elem_id="chat_tokens")
                chat_images = gr.Slider(0, 4, value=1, step=1, label="Max images", elem_id="chat_max_images")
                chat_temp = gr.Slider(0.0, 2.0, value=0.0, step=0.05, label="Text temperature",
                                      elem_id="chat_temperature")
                chat_itemp = gr.Slider(0.0, 2.0, value=1.0, step=0.05, label="Image temperature",
                                       elem_id="chat_image_temperature")
                chat_cfg = gr.Slider(0.0, 10.0, value=0.0, step=0.5, label="CFG scale", elem_id="chat_cfg")
                chat_seed = gr.Number(0, precision=0, label="Seed", elem_id="chat_seed")
            with gr.Row():
                chat_button = gr.Button("Send", variant="primary", elem_id="chat_submit")
                chat_clear = gr.Button("Clear", elem_id="chat_clear")

        def chat(history, prompt, image, max_new_tokens, max_images, temperature, image_temperature, cfg_scale,
                 seed):
            if image is not None:
                _check(run, "image_in")
            parts = _call(run.chat, prompt or "", image, max_new_tokens=int(max_new_tokens),
                          max_images=int(max_images), temperature=float(temperature),
                          image_temperature=float(image_temperature), cfg_scale=float(cfg_scale),
                          seed=int(seed or 0))
            history = list(history or [])
            if image is not None:
                history.append({"role": "user", "content": gr.Image(image, format="png")})
            history.append({"role": "user", "content": _text(prompt or "")})
            for p in parts:  # one message per part keeps text and images in the model's order
                history.append({"role": "assistant",
                                "content": _text(p) if isinstance(p, str) else gr.Image(p, format="png")})
            if not parts:
                history.append({"role": "assistant", "content": _text("(empty answer)")})
            return history, "", None

        chat_inputs = [chat_box, chat_prompt, chat_image, chat_tokens, chat_images, chat_temp, chat_itemp,
                       chat_cfg, chat_seed]
        chat_button.click(chat, chat_inputs, [chat_box, chat_prompt, chat_image], **one)
        chat_prompt.submit(chat, chat_inputs, [chat_box, chat_prompt, chat_image], **one)
        chat_clear.click(lambda: ([], "", None), None, [chat_box, chat_prompt, chat_image], queue=False)
    return demo


def free_port(host: str = "127.0.0.1") -> int:
    """A port the OS says is free now (``--port=0``)."""
    with socket.socket() as s:
        s.bind((host, 0))
        return s.getsockname()[1]


def launch(demo, *, host: str = "127.0.0.1", port: int = 7860, share: bool = False, block: bool = True) -> str:
    """Serves ``demo`` and returns its local URL; ``block=False`` returns at once (the server runs in a thread;
    stop it with ``demo.close()``)."""
    port = free_port(host if host not in ("0.0.0.0", "::") else "127.0.0.1") if port == 0 else int(port)
    logging.getLogger("httpx").setLevel(logging.WARNING)  # gradio's own startup probes of the local URL
    demo.queue(default_concurrency_limit=1)
    _, url, share_url = demo.launch(server_name=host, server_port=port, share=share, prevent_thread_lock=True,
                                    inbrowser=False, quiet=True, show_error=True, ssr_mode=False)
    print(f"uvjax demo: {url}" + (f" (public: {share_url})" if share_url else ""), flush=True)
    if block:
        demo.block_thread()
    return url


def parse_flags(argv: list[str]) -> list[str]:
    """absl ``flags_parser``: the demo's flags, then absl's own (global) flags from what is left."""
    if any(a in ("-h", "-?", "--help", "--helpshort", "--helpfull") for a in argv[1:]):
        print(__doc__.strip() + "\n\nflags:\n" + FLAGS.get_help(include_special_flags=False))
        sys.exit(0)
    try:
        rest = FLAGS(argv, known_only=True)
    except flags.Error as e:
        sys.stderr.write(f"FATAL Flags parsing error: {e}\nPass --help to see the demo's flags.\n")
        sys.exit(1)
    return app.parse_flags_with_usage(rest)


def serve(workdir: str, *, step: int | None = None, host: str = "127.0.0.1", port: int = 7860,
          share: bool = False, block: bool = True):
    """Loads the run once and serves its page: what ``python -m uvjax.demo`` does. With ``block=False`` it
    returns ``(run, app, url)`` at once (stop the server with ``app.close()``)."""
    run = load(workdir, step=step)
    print(f"loaded {run!r}", flush=True)
    app_ = build_app(run)
    url = launch(app_, host=host, port=port, share=share, block=block)
    return run, app_, url


def main(argv):
    if len(argv) > 1:
        raise app.UsageError(f"unexpected arguments: {argv[1:]}")
    serve(FLAGS.workdir, step=FLAGS.step, host=FLAGS.host, port=FLAGS.port, share=FLAGS.share, block=True)


def console_main():
    """The ``uvjax-demo`` console script."""
    app.run(main, flags_parser=parse_flags)


if __name__ == "__main__":
    console_main()
