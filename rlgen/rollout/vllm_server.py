"""vLLM on a process (and devices) of its own: `rlgen serve` runs a `VLLMEngine` behind a small HTTP/JSON
interface, and the trainers reach it with `rollout.vllm_mode = "server"` (TRL's `vllm-serve` and
`vllm_mode = "server"`). Generation runs there while the trainer keeps its devices for the update.

What goes over the wire, and why:
- HTTP with JSON bodies (no pickle): the rows to sample as token ids with their sampling settings and seeds,
  the completions back as token ids, their log-probs and finish reasons. The trainer tokenises and decodes, as
  with the colocated engine, so both modes give the same rollouts for the same seeds.
- Weights over torch.distributed: a two-member process group of its own (gloo on CPU, NCCL on GPU) between the
  server and the trainer's rank 0, set up with `/init_weight_sync` and a TCP store on the server's host at the
  trainer's `rollout.vllm_group_port`. After every optimizer step the trainer streams `checkpoint_weights`
  (LoRA merged, FSDP gathered one parameter at a time on every rank): per tensor a fixed-size header (dtype,
  shape, name length), the name's bytes, then the data, broadcast from the trainer; the server feeds them to
  vLLM's in-place reload as they arrive (`/update_weights`), so neither side ever holds a second whole model.

The server holds its own copy of the model it was started with (loaded as `rlgen` loads any model: no code
from the directory) and samples with it until a trainer pushes weights. Requests may come from every rank of
a trainer at once; the engine runs one at a time. A trainer that goes away leaves the server ready for the next
(`/close_weight_sync`, or a timed-out transfer)."""
from __future__ import annotations

import contextlib
import datetime
import json
import threading
import time
import urllib.error
import urllib.request
from dataclasses import asdict
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Iterator

import torch

from rlgen.errors import RlgenError
from rlgen.models.causal_lm import checkpoint_weights
from rlgen.rollout.engine import SamplingParams
from rlgen.rollout.vllm_engine import Completion, VLLMEngine

PROTOCOL = 1
SERVER_RANK, TRAINER_RANK = 0, 1  # in the weight group; the trainer's rank 0 sends
_MAX_DIMS = 8
_HEADER = 3 + _MAX_DIMS  # more (1) / done (0), dtype code, ndim, shape..., name length
_DTYPES = [torch.float32, torch.float16, torch.bfloat16, torch.float64, torch.int64, torch.int32, torch.int16,
           torch.int8, torch.uint8, torch.bool]
_DTYPES += [d for d in (getattr(torch, "float8_e4m3fn", None), getattr(torch, "float8_e5m2", None)) if d is not None]


def weight_group(host: str, port: int, rank: int, device: torch.device, timeout_s: float):
    """The two-member process group that carries weights (NCCL between GPUs, gloo otherwise); the server's
    side hosts the TCP store. Built from its own store: neither side's default process group is touched."""
    timeout = datetime.timedelta(seconds=timeout_s)
    dist = torch.distributed
    try:
        store = dist.TCPStore(host, port, 2, is_master=rank == SERVER_RANK, timeout=timeout)
    except (RuntimeError, OSError) as exc:
        raise RlgenError(f"the weight-sync group at {host}:{port} did not form: {str(exc).splitlines()[0]}") from None
    prefixed = dist.PrefixStore("rlgen-weights", store)
    if device.type == "cuda":
        return dist.ProcessGroupNCCL(prefixed, rank, 2), store
    return dist.ProcessGroupGloo(prefixed, rank, 2, timeout), store


def _broadcast(group, tensor: torch.Tensor) -> torch.Tensor:
    options = torch.distributed.BroadcastOptions()
    options.rootRank = TRAINER_RANK
    group.broadcast([tensor], options).wait()
    return tensor


def send_weights(group, weights: Iterator[tuple[str, torch.Tensor]], device: torch.device) -> int:
    """Stream (name, tensor) pairs to the server, one at a time -> how many."""
    sent = 0
    for name, tensor in weights:
        if tensor.dim() > _MAX_DIMS:
            raise RlgenError(f"weight {name} has {tensor.dim()} dimensions; the weight stream carries up to {_MAX_DIMS}")
        if tensor.dtype not in _DTYPES:
            raise RlgenError(f"weight {name} is {tensor.dtype}, which the weight stream does not carry")
        encoded = name.encode()
        header = [1, _DTYPES.index(tensor.dtype), tensor.dim(), *tensor.shape, *[0] * (_MAX_DIMS - tensor.dim()), len(encoded)]
        _broadcast(group, torch.tensor(header, dtype=torch.int64, device=device))
        _broadcast(group, torch.tensor(list(encoded), dtype=torch.uint8, device=device))
        _broadcast(group, tensor.detach().to(device).contiguous())
        sent += 1
    _broadcast(group, torch.zeros(_HEADER + 1, dtype=torch.int64, device=device))
    return sent


def receive_weights(group, device: torch.device) -> Iterator[tuple[str, torch.Tensor]]:
    """The server's side of `send_weights`: (name, tensor) pairs as they arrive."""
    while True:
        header = _broadcast(group, torch.zeros(_HEADER + 1, dtype=torch.int64, device=device)).tolist()
        if not header[0]:
            return
        dtype, ndim, length = _DTYPES[header[1]], header[2], header[-1]
        name = bytes(_broadcast(group, torch.zeros(length, dtype=torch.uint8, device=device)).tolist()).decode()
        yield name, _broadcast(group, torch.empty(header[3:3 + ndim], dtype=dtype, device=device))


def _params_dict(params: SamplingParams) -> dict:
    return {**asdict(params), "stop": list(params.stop)}


def _params_of(data: dict) -> SamplingParams:
    try:
        return SamplingParams(**{**data, "stop": tuple(data.get("stop", ()))})
    except TypeError as exc:
        raise ValueError(f"bad sampling settings: {exc}") from None


class RolloutServer:
    """The served engine's request handling, apart from HTTP (tests call it directly too)."""

    def __init__(self, engine: VLLMEngine, *, timeout_s: float = 240.0):
        self.engine = engine
        self.timeout_s = timeout_s
        self.group = None
        self._store = None
        self.weight_updates = 0  # since the current trainer set up its weight group
        self._engine_lock = threading.Lock()  # one engine call at a time
        self._updated = threading.Condition()

    def _wait_for_weights(self, version) -> None:
        """A trainer rank's request names the weights it expects (the updates its trainer has made): it waits
        until rank 0 has sent them, so that no rank samples from weights older than its own."""
        if not version:
            return
        with self._updated:
            if not self._updated.wait_for(lambda: self.weight_updates >= int(version), timeout=self.timeout_s):
                raise ValueError(f"weights {version} never arrived (the server holds {self.weight_updates}) within "
                                 f"{self.timeout_s:g} s")

    def info(self) -> dict:
        config = self.engine.model.config
        return {"protocol": PROTOCOL, "model_type": getattr(config, "model_type", None),
                "vocab_size": getattr(config, "vocab_size", None), "max_model_len": self.engine.max_model_len,
                "weight_updates": self.weight_updates, "weight_sync": self.group is not None}

    def handle(self, path: str, body: dict) -> dict:
        if path == "/health":
            return self.info()
        if path == "/generate":
            self._wait_for_weights(body.get("weights"))
            params = _params_of(body["params"])
            prompts = body["prompt_token_ids"]
            longest = max((len(ids) for ids in prompts), default=0)
            if longest + params.max_new_tokens > self.engine.max_model_len:
                raise ValueError(f"a prompt of {longest} tokens plus max_new_tokens={params.max_new_tokens} exceeds the "
                                 f"served engine's context of {self.engine.max_model_len} positions (rlgen serve "
                                 "--max-model-len)")
            with self._engine_lock:
                if self.engine.stale:  # no trainer yet: the model the server was started with
                    self.engine.push_weights()
                completions = self.engine.sample(prompts, params, body["seeds"]) if prompts else []
            return {"completions": [asdict(c) for c in completions]}
        if path == "/prompt_logprobs":
            self._wait_for_weights(body.get("weights"))
            with self._engine_lock:
                if self.engine.stale:
                    self.engine.push_weights()
                return {"logprobs": self.engine.prompt_logprobs(body["token_ids"])}
        if path == "/init_weight_sync":
            self.close_group()
            device = self.engine.device if self.engine.device.type == "cuda" else torch.device("cpu")
            self.group, self._store = weight_group(body["host"], int(body["port"]), SERVER_RANK, device,
                                                   float(body.get("timeout_s", self.timeout_s)))
            with self._updated:
                self.weight_updates = 0
            return {"ok": True}
        if path == "/update_weights":
            if self.group is None:
                raise ValueError("no weight-sync group: /init_weight_sync first")
            device = self.engine.device if self.engine.device.type == "cuda" else torch.device("cpu")
            with self._engine_lock:
                try:
                    self.engine.load_weights(receive_weights(self.group, device))
                except Exception:
                    self.close_group()  # a half-sent stream leaves the group unusable: the trainer sets up a new one
                    raise
                self.engine.stale = False
            with self._updated:
                self.weight_updates += 1
                self._updated.notify_all()
            return {"ok": True, "weight_updates": self.weight_updates}
        if path == "/close_weight_sync":
            self.close_group()
            return {"ok": True}
        raise KeyError(path)

    def close_group(self) -> None:
        group, self.group, self._store = self.group, None, None
        if group is not None:
            with contextlib.suppress(Exception):
                group.shutdown()


def serve(engine: VLLMEngine, host: str, port: int, *, log=print, timeout_s: float = 240.0,
          ready: threading.Event | None = None) -> None:
    """Serve `engine` on http://host:port until interrupted (KeyboardInterrupt / SIGTERM as SystemExit)."""
    server_state = RolloutServer(engine, timeout_s=timeout_s)

    class Handler(BaseHTTPRequestHandler):
        def _reply(self, code: int, data: dict) -> None:
            payload = json.dumps(data).encode()
            self.send_response(code)
            self.send_header("Content-Type", "application/json")
            self.send_header("Content-Length", str(len(payload)))
            self.end_headers()
            self.wfile.write(payload)

        def _serve(self, body: dict) -> None:
            path = self.path.split("?")[0]
            try:
                self._reply(200, server_state.handle(path, body))
            except KeyError as exc:
                if exc.args and exc.args[0] == path:
                    self._reply(404, {"error": f"no endpoint {path}"})
                else:
                    self._reply(400, {"error": f"missing field {exc}"})
            except (ValueError, TypeError, RlgenError) as exc:
                self._reply(400, {"error": str(exc)})
            except Exception as exc:  # noqa: BLE001 - vLLM's own failure, reported to the client and logged
                log(f"{path}: {type(exc).__name__}: {str(exc).splitlines()[0] if str(exc) else ''}")
                self._reply(500, {"error": f"{type(exc).__name__}: {str(exc).splitlines()[0] if str(exc) else ''}"})

        def do_GET(self):  # noqa: N802 - http.server's name
            self._serve({})

        def do_POST(self):  # noqa: N802
            length = int(self.headers.get("Content-Length") or 0)
            try:
                body = json.loads(self.rfile.read(length) or b"{}")
            except json.JSONDecodeError as exc:
                self._reply(400, {"error": f"the request body is not JSON: {exc}"})
                return
            self._serve(body if isinstance(body, dict) else {})

        def log_message(self, format, *args):  # noqa: A002 - quiet: rlgen's stderr is for its own lines
            return

    httpd = ThreadingHTTPServer((host, port), Handler)
    httpd.daemon_threads = True
    log(f"serving {engine.model.config.model_type} with vLLM on http://{host}:{httpd.server_address[1]} "
        f"(context {engine.max_model_len} tokens); trainers: rollout.vllm_mode = 'server'")
    if ready is not None:
        ready.set()
    try:
        httpd.serve_forever()
    finally:
        httpd.server_close()
        server_state.close_group()


class RemoteVLLMEngine(VLLMEngine):
    """The trainer's side of `rlgen serve`: `VLLMEngine`'s contract with generation done by the server.
    As with the colocated engine, an update marks the weights stale and the next generation pushes them: rank 0
    sends them (under FSDP every rank walks them, the gathers being collective), and every request names the
    weights its rank expects (`weights`: the updates so far), which the server waits for, so no rank samples
    from older weights and no rank waits for another outside the server."""

    def __init__(self, model, tokenizer, *, host: str = "127.0.0.1", port: int = 8000, group_port: int = 51216,
                 timeout_s: float = 240.0, dist=None, gather_everywhere: bool = False):
        from rlgen.rollout.engine import stop_token_ids

        self.model = model
        self.tokenizer = tokenizer
        self.url = f"http://{host}:{port}"
        self.host, self.group_port, self.timeout_s = host, group_port, timeout_s
        self.dist = dist
        self.stop_ids = torch.tensor(stop_token_ids(model, tokenizer))
        self.pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else self.stop_ids[0].item()
        self._stop_set = set(self.stop_ids.tolist())
        self.add_special_tokens = True
        self.finished_everywhere = None
        self.sleep_mode = self.sleeping = False
        self.weight_syncs = 0
        self.group = None
        self._config_dir = None
        info = self._wait_for_server()
        ours = getattr(getattr(model, "config", None), "vocab_size", None)
        if info.get("vocab_size") not in (None, ours):
            raise RlgenError(f"the vLLM server at {self.url} serves a model with a {info['vocab_size']}-token vocabulary, "
                             f"the policy has {ours}: start it on the policy's model (rlgen serve --model ...)")
        self.max_model_len = int(info["max_model_len"])
        self.is_sender = self.dist is None or self.dist.is_main
        self.gather_everywhere = gather_everywhere
        if self.is_sender:
            self._join_weight_group()
        self.version = 1  # the weights the server should hold: 1 = the policy's at the start
        self.stale = True

    # --- HTTP ---
    def _post(self, path: str, body: dict | None = None, timeout: float | None = None) -> dict:
        data = json.dumps(body or {}).encode()
        request = urllib.request.Request(self.url + path, data=data, headers={"Content-Type": "application/json"},
                                         method="POST")
        try:
            with urllib.request.urlopen(request, timeout=timeout or self.timeout_s) as response:
                return json.loads(response.read())
        except urllib.error.HTTPError as exc:
            try:
                reason = json.loads(exc.read()).get("error", exc.reason)
            except (json.JSONDecodeError, OSError):
                reason = exc.reason
            raise RlgenError(f"the vLLM server at {self.url}{path} answered {exc.code}: {reason}") from None
        except (urllib.error.URLError, OSError) as exc:
            reason = getattr(exc, "reason", exc)
            raise RlgenError(f"the vLLM server at {self.url} is not reachable: {reason} (start it with rlgen serve; "
                             "rollout.vllm_server_host / vllm_server_port say where it is)") from None

    def _wait_for_server(self) -> dict:
        """The server's /health, waiting up to the timeout for it to come up (TRL's vllm_server_timeout)."""
        deadline = time.monotonic() + self.timeout_s
        while True:
            try:
                info = self._post("/health", timeout=10)
                break
            except RlgenError:
                if time.monotonic() > deadline:
                    raise
                time.sleep(1.0)
        if info.get("protocol") != PROTOCOL:
            raise RlgenError(f"{self.url} is not an rlgen vLLM server of this version (protocol {info.get('protocol')}, "
                             f"expected {PROTOCOL})")
        return info

    def _join_weight_group(self) -> None:
        """The weight group with the server: its side starts in a request thread, ours here."""
        device = self.device if self.device.type == "cuda" else torch.device("cpu")
        failure: list[BaseException] = []

        def ask() -> None:
            try:
                self._post("/init_weight_sync", {"host": self.host, "port": self.group_port, "timeout_s": self.timeout_s})
            except BaseException as exc:  # noqa: BLE001 - raised below, in the caller's thread
                failure.append(exc)

        thread = threading.Thread(target=ask, daemon=True)
        thread.start()
        try:
            self.group, self._store = weight_group(self.host, self.group_port, TRAINER_RANK, device, self.timeout_s)
        finally:
            thread.join()
        if failure:
            raise failure[0]

    # --- weights ---
    def sync_weights(self, model) -> None:
        self.model = model
        if not self.stale:
            self.version += 1
        self.stale = True

    def push_weights(self) -> None:
        """Rank 0 sends the policy's weights (under FSDP every rank walks them: the gathers are collective)."""
        weights = checkpoint_weights(self.model)
        if self.is_sender:
            device = self.device if self.device.type == "cuda" else torch.device("cpu")
            reply: list = []

            def receive() -> None:
                try:
                    reply.append(self._post("/update_weights", timeout=self.timeout_s))
                except BaseException as exc:  # noqa: BLE001
                    reply.append(exc)

            thread = threading.Thread(target=receive, daemon=True)
            thread.start()
            try:
                send_weights(self.group, weights, device)
            finally:
                thread.join()
            if isinstance(reply[0], BaseException):
                raise reply[0]
        elif self.gather_everywhere:
            for _ in weights:  # the gathers are collective: every rank takes part
                pass
        self.stale = False
        self.weight_syncs += 1
        if self.weight_syncs == 1:  # on every rank: under FSDP the policy's forward is collective
            self._check_weights()

    def sleep(self) -> None:
        return

    def close(self) -> None:
        group, self.group = self.group, None
        if group is not None:
            with contextlib.suppress(RlgenError):
                self._post("/close_weight_sync", timeout=10)
            with contextlib.suppress(Exception):
                group.shutdown()

    # --- tokens in, tokens out ---
    def sample(self, prompt_lists, params: SamplingParams, seeds) -> list[Completion]:
        reply = self._post("/generate", {"prompt_token_ids": prompt_lists, "params": _params_dict(params), "seeds": seeds,
                                         "weights": self.version})
        return [Completion(**c) for c in reply["completions"]]

    def prompt_logprobs(self, token_lists: list[list[int]]) -> list[list[float]]:
        return self._post("/prompt_logprobs", {"token_ids": token_lists, "weights": self.version})["logprobs"]

