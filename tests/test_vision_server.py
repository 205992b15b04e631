"""Images through `hfbridge serve`'s chat route, with the official `openai` client: answers equal Transformers'
greedy generate() with the model's processor; every bad image is a 400 naming the problem."""
import base64
import http.server
import io
import threading
import time

import openai
import pytest
from PIL import Image
from server_utils import free_port, start_server, stop_server
from test_vision import hf_greedy_with_images
from tiny_vlms import draw_image, make_tiny_vlm

MODEL = "tiny-llava"


@pytest.fixture(scope="module")
def llava(tmp_path_factory):
    return make_tiny_vlm("LlavaForConditionalGeneration", tmp_path_factory.mktemp("llava"))


@pytest.fixture(scope="module")
def media(tmp_path_factory):
    folder = tmp_path_factory.mktemp("media")
    draw_image(11).save(folder / "a.png")
    return folder


@pytest.fixture(scope="module")
def slow_url():
    """An http server on loopback that answers after 3 s (/slow.png), or trickles a byte every 0.5 s (/trickle.png);
    the server's fetch timeout is 1 s here."""
    class Slow(http.server.BaseHTTPRequestHandler):
        def do_GET(self):  # noqa: N802 - the http.server name
            if self.path == "/slow.png":
                time.sleep(3)
            self.send_response(200)
            self.end_headers()
            if self.path == "/trickle.png":
                for _ in range(8):
                    self.wfile.write(b"\x89")
                    self.wfile.flush()
                    time.sleep(0.5)

        def log_message(self, *args):
            pass

    httpd = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Slow)
    threading.Thread(target=httpd.serve_forever, daemon=True).start()
    yield f"http://127.0.0.1:{httpd.server_address[1]}/slow.png"
    httpd.shutdown()


@pytest.fixture(scope="module")
def client(llava, media, tmp_path_factory):
    log = tmp_path_factory.mktemp("serve") / "serve.log"
    process, url = start_server(
        [str(llava[3]), "--served-model-name", MODEL, "--max-model-len", "256", "--dtype", "float32",
         "--limit-mm-per-prompt", '{"image": 2}', "--allowed-local-media-path", str(media),
         "--allowed-media-domains", "127.0.0.1"], log, env={"HFBRIDGE_IMAGE_FETCH_TIMEOUT": "1"})
    yield openai.OpenAI(base_url=url + "/v1", api_key="none", max_retries=0, timeout=60)
    stop_server(process)
    assert process.returncode == 0, open(log).read()


def data_url(image, kind="PNG"):
    buffer = io.BytesIO()
    image.save(buffer, format=kind)
    return f"data:image/{kind.lower()};base64," + base64.b64encode(buffer.getvalue()).decode()


def image_message(*urls, text="What is this?"):
    return [{"role": "user", "content": [{"type": "text", "text": text},
                                         *({"type": "image_url", "image_url": {"url": u}} for u in urls)]}]


def expected_text(llava, images, text="What is this?"):
    model, processor, _, _ = llava
    hf_messages = [{"role": "user", "content": [{"type": "text", "text": text}, *({"type": "image"} for _ in images)]}]
    prompt = processor.apply_chat_template(hf_messages, add_generation_prompt=True, tokenize=False)
    tokens, _ = hf_greedy_with_images(model, processor, prompt, images, add_special_tokens=False)
    return processor.tokenizer.decode(tokens, skip_special_tokens=True)


def test_chat_with_images_equals_transformers(client, llava, media):
    a, b = draw_image(12, (60, 44)), Image.open(media / "a.png")
    cases = [([data_url(a)], [a]), ([data_url(a), f"file://{media}/a.png"], [a, b])]
    for urls, images in cases:
        whole = client.chat.completions.create(model=MODEL, messages=image_message(*urls), max_completion_tokens=8,
                                               temperature=0)
        assert whole.choices[0].message.content == expected_text(llava, images)
        chunks = client.chat.completions.create(model=MODEL, messages=image_message(*urls), max_completion_tokens=8,
                                                temperature=0, stream=True)
        streamed = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
        assert streamed == whole.choices[0].message.content


def test_bad_images_answer_400_naming_the_problem(client, media, tmp_path, slow_url):
    outside = tmp_path / "outside.png"
    draw_image(13).save(outside)
    bomb, big = io.BytesIO(), io.BytesIO()
    Image.new("1", (9000, 9000)).save(bomb, format="PNG")
    Image.new("1", (6000, 6000)).save(big, format="PNG")  # under the per-image limit; two are over the prompt's
    big_url = "data:image/png;base64," + base64.b64encode(big.getvalue()).decode()
    cases = [
        (["data:image/png;base64,%%%"], "not valid base64"),
        (["data:text/plain;base64,aGVsbG8="], "must hold an image"),
        (["data:image/png;base64," + base64.b64encode(b"\x89PNG broken").decode()], "could not be decoded"),
        (["data:image/png;base64," + base64.b64encode(bomb.getvalue()).decode()], "more than the limit"),
        ([data_url(draw_image(1))] * 3, "more than the limit of 2"),
        ([big_url, big_url], "pixels together"),
        ([f"file://{outside}"], "must name a file under"),
        ([f"file://{media}/../{outside.name}"], "must name a file under"),
        ([f"http://127.0.0.1:{free_port()}/gone.png"], "could not fetch"),
        ([slow_url], "could not fetch"),
        ([slow_url.replace("slow", "trickle")], "took longer than 1 s"),
        (["http://example.com/cat.png"], "not allowed"),
    ]
    for urls, message in cases:
        with pytest.raises(openai.BadRequestError, match=message):
            client.chat.completions.create(model=MODEL, messages=image_message(*urls), max_completion_tokens=4)
    # the server is unharmed
    ok = client.chat.completions.create(model=MODEL, messages=image_message(data_url(draw_image(1))),
                                        max_completion_tokens=2)
    assert ok.choices[0].finish_reason == "length"
