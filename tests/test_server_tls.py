"""TLS and refused security flags of `hfbridge serve`: the official openai client over https to a real server
process with a self-signed certificate made here by the `openssl` binary (the client trusts only it), and
vLLM flags that would weaken security if ignored, which must stop the server instead."""
import shutil
import ssl
import subprocess

import httpx2 as httpx  # the HTTP client the installed openai package uses
import openai
import pytest
from server_utils import start_server, stop_server

from hfbridge.entrypoints.cli import main

pytestmark = pytest.mark.skipif(shutil.which("openssl") is None, reason="needs the openssl binary")


@pytest.fixture(scope="module")
def certificate(tmp_path_factory):
    folder = tmp_path_factory.mktemp("tls")
    key, cert = folder / "key.pem", folder / "cert.pem"
    subprocess.run(["openssl", "req", "-x509", "-newkey", "rsa:2048", "-nodes", "-keyout", str(key), "-out",
                    str(cert), "-days", "1", "-subj", "/CN=localhost",
                    "-addext", "subjectAltName=IP:127.0.0.1,DNS:localhost"], check=True, capture_output=True)
    return key, cert


def test_openai_client_over_https(tiny_llama, certificate, tmp_path):
    key, cert = certificate
    trust = ssl.create_default_context(cafile=str(cert))
    process, url = start_server([str(tiny_llama[1]), "--served-model-name", "tiny", "--max-model-len", "128",
                                 "--dtype", "float32", "--ssl-keyfile", str(key), "--ssl-certfile", str(cert)],
                                tmp_path / "serve.log", ssl_context=trust)
    try:
        assert url.startswith("https://")
        client = openai.OpenAI(base_url=url + "/v1", api_key="none", max_retries=0, timeout=60,
                               http_client=httpx.Client(verify=trust))
        completion = client.completions.create(model="tiny", prompt="The capital of", max_tokens=3)
        assert completion.choices[0].finish_reason in ("length", "stop") and completion.usage.completion_tokens > 0
        chat = client.chat.completions.create(model="tiny", messages=[{"role": "user", "content": "hi"}],
                                              max_tokens=3, stream=True)
        assert sum(1 for _ in chat) >= 2
        # Plain HTTP on the TLS port is not served, and a client that does not trust the certificate refuses it.
        with pytest.raises(httpx.HTTPError):
            httpx.get(url.replace("https://", "http://") + "/health", timeout=5)
        with pytest.raises(openai.APIConnectionError):
            openai.OpenAI(base_url=url + "/v1", api_key="none", max_retries=0, timeout=10).models.list()
    finally:
        stop_server(process)


@pytest.mark.parametrize("args, message", [
    (["--ssl-keyfile", "{key}"], "need --ssl-certfile"),
    (["--ssl-certfile", "{cert}", "--ssl-keyfile", "{cert}"], "TLS:"),  # a certificate is not a private key
    (["--middleware", "my.Auth"], "--middleware is not supported"),
    (["--uds", "/tmp/x.sock"], "--uds is not supported"),
])
def test_security_flags_are_never_silently_ignored(certificate, args, message, capsys):
    key, cert = certificate
    with pytest.raises(SystemExit) as exit_info:  # before any model is loaded or any port opened
        main(["serve", "/nonexistent-model", *[a.format(key=key, cert=cert) for a in args]])
    assert exit_info.value.code == 2
    assert message in capsys.readouterr().err
