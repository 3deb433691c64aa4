"""The `ember` command. Thin: it parses arguments, loads a spec, and calls one function of a plane.

Each verb's parser names its handler (`set_defaults(func=...)`); which address form a verb takes, and where its
address comes from without `--address`, are `ember.connection`'s. Errors a user can fix print as one line on stderr
with exit status 1; `--debug` shows the traceback.
"""

from __future__ import annotations

import argparse
import importlib
import logging
import os
import sys
import time
from pathlib import Path

from ember import __version__
from ember.connection import (
    ADDRESS_ENV,
    DASHBOARD,
    GCS,
    LOOPBACK_NODE_ENV,
    TOKEN_AUTH_ENV,
    address_form,
    address_help,
    cluster_address,
    talks_to_a_cluster,
    use_loopback_node_address,
    use_token_auth,
)
from ember.errors import EmberError
from ember.runtime import LOG_LEVEL_ENV, debugging, find_ember_error, quiet_libraries

# Job kind -> "module:function" that runs it; imported only when that kind runs.
JOB_RUNNERS = {
    "tokenize": "ember.data.pipeline:run_tokenize",
    "pretrain": "ember.train.pretrain:run_pretrain",
    "finetune": "ember.train.finetune:run_finetune",
    "preference": "ember.train.preference:run_preference",
    "evaluate": "ember.eval.evaluate:run_evaluate",
}

_EPILOG = """examples:
  ember run jobs/tokenize-demo.yaml
  ember run jobs/tokenize-demo.yaml --set pack.seq_len=128 --set output.dir=data/short
  ember run jobs/tokenize-demo.yaml --address auto   # on the Ray cluster this machine is a node of
"""


def _parser() -> argparse.ArgumentParser:
    """The `ember` command's arguments, added a verb (or two small ones) per step."""
    common = argparse.ArgumentParser(add_help=False)
    common.add_argument("--debug", action="store_true", default=argparse.SUPPRESS,
                        help="show full tracebacks and Ray's own logs")
    parser = argparse.ArgumentParser(
        prog="ember", parents=[common], formatter_class=argparse.RawDescriptionHelpFormatter, epilog=_EPILOG,
        description="Ember: corpus → tokenizer and shards → pretraining and fine-tuning → serving, on Ray. "
                    "Each job is one YAML spec (see jobs/).")
    parser.add_argument("--version", action="version", version=f"ember {__version__}")
    verbs = parser.add_subparsers(dest="verb", metavar="VERB")
    verbs.required = True
    for add_verbs in (_add_run, _add_submit, _add_jobs, _add_demo, _add_report_and_status, _add_cluster, _add_serve,
                      _add_generate, _add_import):
        add_verbs(verbs, common)
    return parser


# The two forms of --address (see ember.cluster.address); every verb takes either.
_EITHER_FORM = ("the Ray cluster, by its GCS address HOST:PORT (e.g. 10.0.0.5:6379, or 'auto') or its dashboard URL "
                "(e.g. http://10.0.0.5:8265); either form works")


def _address_arg(parser, verb: str) -> None:
    """--address for `verb`; its default says where the address of the verb's form comes from without it."""
    parser.add_argument("--address", default=None, help=f"{_EITHER_FORM} (default: {address_help(address_form(verb))})")


def _add_run(verbs, common) -> None:
    run = verbs.add_parser(
        "run", parents=[common], formatter_class=argparse.RawDescriptionHelpFormatter,
        help="run a job spec (tokenize, ...) on Ray",
        description="Run a job spec. Connects to the Ray cluster given by --address or RAY_ADDRESS, otherwise starts "
                    f"a local Ray instance. Job kinds: {', '.join(JOB_RUNNERS)}.",
        epilog=_EPILOG)
    run.add_argument("spec", metavar="SPEC.yaml", help="the job spec file")
    run.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                     help="override a spec value, e.g. --set pack.seq_len=256 (repeatable; values are read as YAML)")
    _address_arg(run, "run")
    run.set_defaults(func=cmd_run)
    run.add_argument("--workdir", default=None, metavar="DIR",
                     help="resolve the spec's relative paths against DIR instead of the current directory (what "
                          "`ember submit` uses on the cluster)")


def _add_submit(verbs, common) -> None:
    sub = verbs.add_parser(
        "submit", parents=[common], formatter_class=argparse.RawDescriptionHelpFormatter,
        help="submit a job spec to a Ray cluster (Ray Jobs API)",
        description="Submit a job spec to a Ray cluster through the Ray Jobs API. The job runs `ember run` on the "
                    "spec there, with this machine's Ember code. The spec is checked here first; its input paths are "
                    "checked where the job runs.",
        epilog="examples:\n  ember cluster up && ember submit jobs/tokenize-demo.yaml --wait\n"
               "  ember submit jobs/pretrain-demo.yaml --address http://10.0.0.5:8265 --set train.max_steps=100\n"
               "  ember submit jobs/finetune-demo.yaml --env HF_HOME=/mnt/cache --workdir /mnt/shared/ember")
    sub.add_argument("spec", metavar="SPEC.yaml", help="the job spec file")
    sub.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                     help="override a spec value (repeatable; passed on to `ember run` on the cluster)")
    _address_arg(sub, "submit")
    sub.set_defaults(func=cmd_submit)
    sub.add_argument("--wait", action="store_true", help="follow the job's logs and exit with its result")
    sub.add_argument("--env", action="append", default=[], metavar="NAME[=VALUE]",
                     help="environment variable for the job (repeatable; NAME alone takes this shell's value)")
    sub.add_argument("--workdir", default=None, metavar="DIR",
                     help="directory on the cluster that the spec's relative paths resolve against (default: this "
                          "directory when the cluster is on this machine, else the job's own working dir)")


def _add_jobs(verbs, common) -> None:
    jobs = verbs.add_parser("jobs", parents=[common], help="list, inspect, follow and stop jobs on a Ray cluster",
                            description="Jobs on a Ray cluster (Ember's and any other), through the Ray Jobs API.")
    jverbs = jobs.add_subparsers(dest="jobs_verb", metavar="ACTION")
    jverbs.required = True
    jl = jverbs.add_parser("list", parents=[common], help="all jobs, oldest first")
    jl.add_argument("--ember", action="store_true", help="only Ember's jobs")
    jl.set_defaults(func=cmd_jobs_list)
    for name, text, handler in (("status", "a job's status, progress and error", cmd_jobs_status),
                                ("logs", "a job's output", cmd_jobs_logs),
                                ("stop", "stop a running job", cmd_jobs_stop)):
        j = jverbs.add_parser(name, parents=[common], help=text)
        j.add_argument("job_id", metavar="ID", help="the submission id (`ember jobs list`)")
        _address_arg(j, "jobs")
        j.set_defaults(func=handler)
        if name == "logs":
            j.add_argument("--follow", "-f", action="store_true", help="keep following until the job ends")
    _address_arg(jl, "jobs")


def _add_demo(verbs, common) -> None:
    demo = verbs.add_parser(
        "demo", parents=[common], formatter_class=argparse.RawDescriptionHelpFormatter,
        help="the whole pipeline on the built-in corpus: tokenize → pretrain → fine-tune → evaluate → serve → ask",
        description="Runs jobs/tokenize-demo.yaml, pretrain-demo, finetune-demo and evaluate-demo, writes reports, "
                    "serves the fine-tuned model with serve/demo.yaml (autoscaling), asks it a question through the "
                    "OpenAI API and shuts it down. A rerun reuses finished stages. Relative paths (data/, runs/) "
                    "resolve against the current directory.",
        epilog="examples:\n  ember demo\n  ember demo --keep-serving --port 8001\n"
               "  ember demo --set pretrain.train.max_steps=100 --set finetune.method=lora")
    demo.add_argument("--keep-serving", action="store_true", help="leave the app up at the end (Ctrl-C stops it)")
    demo.add_argument("--port", type=int, default=None, help="HTTP port of the app (default: serve/demo.yaml's)")
    _address_arg(demo, "demo")
    demo.set_defaults(func=cmd_demo)
    demo.add_argument("--set", dest="overrides", action="append", default=[], metavar="STAGE.KEY=VALUE",
                      help="override a stage's spec, e.g. --set pretrain.train.max_steps=100 (repeatable)")


def _add_report_and_status(verbs, common) -> None:
    rep = verbs.add_parser("report", parents=[common], help="plots and a summary of a training run",
                           description="Writes RUN_DIR/report/{loss,learning_rate,tokens_per_second}.png and "
                                       "summary.txt from the run's metrics.jsonl, and prints the summary.")
    rep.add_argument("run_dir", metavar="RUN_DIR", help="a pretrain or finetune output dir")
    rep.add_argument("--eval", action="append", default=[], metavar="RESULTS.json",
                     help="an evaluate job's results to show next to the curves (those under RUN_DIR/eval/ are "
                          "shown anyway)")
    rep.set_defaults(func=cmd_report)

    st = verbs.add_parser("status", parents=[common], help="the cluster, Ember's jobs and Serve apps on one screen",
                          description="Nodes and resources, running and recent Ember jobs with their latest progress, "
                                      "Serve applications with their replicas, and the dashboard URL.")
    _address_arg(st, "status")
    st.set_defaults(func=cmd_status)


def _add_cluster(verbs, common) -> None:
    clu = verbs.add_parser("cluster", parents=[common], help="a local multi-node Ray cluster on this machine",
                           description="A real Ray cluster on this machine: a head and N worker nodes (separate "
                                       "raylets), bound to 127.0.0.1, with Ray's token authentication on.")
    cverbs = clu.add_subparsers(dest="cluster_verb", metavar="ACTION")
    cverbs.required = True
    cu = cverbs.add_parser("up", parents=[common], help="start the head and worker nodes")
    cu.add_argument("--workers", type=int, default=2, help="worker nodes besides the head (default: 2)")
    cu.add_argument("--cpus-per-node", type=float, default=1, help="CPUs each node offers Ray (default: 1)")
    cu.add_argument("--head-cpus", type=float, default=None, help="CPUs of the head node (default: --cpus-per-node)")
    cu.add_argument("--max-workers", type=int, default=None,
                    help="run Ray's autoscaler: it adds worker nodes on demand, up to this many (default: none)")
    cu.add_argument("--port", type=int, default=6379, help="GCS port (default: 6379)")
    cu.add_argument("--dashboard-port", type=int, default=8265, help="dashboard port (default: 8265)")
    cu.set_defaults(func=cmd_cluster_up)
    cverbs.add_parser("status", parents=[common], help="nodes and resources of the local cluster").set_defaults(
        func=cmd_cluster_status)
    cverbs.add_parser("down", parents=[common], help="stop exactly the processes `up` started").set_defaults(
        func=cmd_cluster_down)
    for c in cverbs.choices.values():
        c.add_argument("--dir", default=None, help="where the cluster's state is kept (default: $EMBER_CLUSTER_DIR, "
                                                   "else ~/.ember/cluster)")


def _add_serve(verbs, common) -> None:
    srv = verbs.add_parser(
        "serve", parents=[common], formatter_class=argparse.RawDescriptionHelpFormatter,
        help="serve a model dir (or a Ray Serve config) behind an OpenAI-compatible API",
        description="Deploy Ember's OpenAI-compatible app on Ray Serve, wait until it answers, print its URL. Without "
                    "--detach, Ctrl-C shuts the app down.",
        epilog="examples:\n  ember serve serve/demo.yaml\n  ember serve runs/finetune-demo/model --port 8001\n"
               "  ember serve serve/demo.yaml --address 127.0.0.1:6379 --detach")
    srv.add_argument("target", metavar="SERVE.yaml|MODEL_DIR", help="a Ray Serve config file or a model dir")
    _address_arg(srv, "serve")
    srv.set_defaults(func=cmd_serve)
    srv.add_argument("--detach", action="store_true", help="leave the app running on the cluster and exit")
    srv.add_argument("--host", default=None, help="HTTP host (default: the config's, else 127.0.0.1)")
    srv.add_argument("--port", type=int, default=None, help="HTTP port (default: the config's, else 8000)")


def _add_generate(verbs, common) -> None:
    gen = verbs.add_parser(
        "generate", parents=[common], formatter_class=argparse.RawDescriptionHelpFormatter,
        help="generate text from a model dir, streamed to the terminal",
        description="Load a model dir (Ember's export, or a Llama, Qwen2, Qwen3 or Mistral checkpoint in safetensors "
                    "with a tokenizer.json) and stream a continuation of the prompt. Temperature 0 is greedy.",
        epilog="example:\n  ember generate runs/demo/model --prompt 'The json module' --max-tokens 64 --seed 1")
    gen.add_argument("model_dir", metavar="MODEL_DIR", help="a model directory (Llama, Qwen2, Qwen3 or Mistral)")
    gen.add_argument("--prompt", required=True, help="the text to continue (with --chat: the user's message)")
    gen.add_argument("--chat", action="store_true",
                     help="wrap the prompt as a user turn in the model's chat template and answer it")
    gen.add_argument("--max-tokens", type=int, default=128, help="new tokens at most (default: 128)")
    gen.add_argument("--temperature", type=float, default=0.8, help="0 = greedy (default: 0.8)")
    gen.add_argument("--top-p", type=float, default=0.95, help="nucleus sampling mass, 1 = off (default: 0.95)")
    gen.add_argument("--top-k", type=int, default=0, help="sample among the k likeliest tokens, 0 = off")
    gen.add_argument("--repetition-penalty", type=float, default=1.0, help="> 1 discourages repeats (default: 1)")
    gen.add_argument("--stop", action="append", default=[], metavar="TEXT", help="stop string (repeatable)")
    gen.add_argument("--seed", type=int, default=None, help="same seed, same output")
    gen.add_argument("--dtype", choices=["float32", "bfloat16", "float16"], default="float32",
                     help="compute dtype (default: float32)")
    gen.set_defaults(func=cmd_generate)


def _add_import(verbs, common) -> None:
    imp = verbs.add_parser(
        "import", parents=[common], formatter_class=argparse.RawDescriptionHelpFormatter,
        help="import a GGUF file (llama.cpp) as a model dir",
        description="Read a .gguf file (Llama, Qwen2, Qwen3 or Mistral; F32, F16, BF16, Q8_0, Q4_0, Q4_1, Q5_0, Q5_1 "
                    "and K-quant tensors), dequantize it and write a Hugging Face model dir: safetensors, config.json, "
                    "tokenizer.json, tokenizer_config.json with the chat template, and lineage.json (the file's name, "
                    "SHA-256 and quantization). Nothing is written unless the whole file reads and checks.",
        epilog="example:\n  ember import SmolLM2-135M-Instruct.Q4_1.gguf models/smollm2\n"
               "  ember generate models/smollm2 --chat --prompt 'What does json.dumps do?' --temperature 0")
    imp.add_argument("gguf", metavar="FILE.gguf", help="the GGUF file (a path or a URI)")
    imp.add_argument("output", metavar="OUTPUT", help="the model dir to write (a path or a bucket URI)")
    imp.add_argument("--dtype", choices=["float32", "bfloat16", "float16"], default="float32",
                     help="the weights' dtype in the model dir (default: float32)")
    imp.set_defaults(func=cmd_import)


def _runner(kind: str):
    module, _, name = JOB_RUNNERS[kind].partition(":")
    return getattr(importlib.import_module(module), name)


# Each verb imports its plane when it runs: `ember --help` and the light verbs start without torch, Ray or DeepSpeed.
def cmd_run(args) -> int:
    from ember.config import load_spec

    spec = load_spec(args.spec, args.overrides)
    if args.workdir:
        try:
            os.chdir(args.workdir)
        except OSError as exc:
            raise EmberError(f"--workdir {args.workdir}: {exc.strerror}") from None
    _runner(spec.kind)(spec, address=args.address)  # each runner checks its inputs before it connects to Ray
    return 0


def cmd_generate(args) -> int:
    from ember.data.tokenizer import load_tokenizer
    from ember.model import SamplingParams, TextStream, builtin, generation_stops, load_model
    from ember.model.hf_format import DTYPES

    params = SamplingParams(max_new_tokens=args.max_tokens, temperature=args.temperature, top_p=args.top_p,
                            top_k=args.top_k, repetition_penalty=args.repetition_penalty, stop=tuple(args.stop),
                            seed=args.seed).validate()
    model_dir = builtin.resolve(args.model_dir)
    model = load_model(model_dir, dtype=DTYPES[args.dtype])
    tokenizer = load_tokenizer(model_dir)
    prompt = args.prompt
    if args.chat:
        from ember.data.chat import ChatTemplate
        from ember.data.tokenizer import tokenizer_config

        template = ChatTemplate.of(tokenizer_config(model_dir))
        if template is None:
            raise EmberError(f"{args.model_dir} has no chat template (tokenizer_config.json); drop --chat")
        prompt = template.render([{"role": "user", "content": args.prompt}], add_generation_prompt=True)
    stops = generation_stops(tokenizer, chat=args.chat, model_dir=model_dir)  # with --chat, the answer's turn end too
    stream = TextStream(model, tokenizer, prompt, params, stops)
    start = time.perf_counter()
    for chunk in stream:
        sys.stdout.write(chunk)
        sys.stdout.flush()
    seconds = time.perf_counter() - start
    done = stream.completion
    sys.stdout.write("\n")
    print(f"[{len(done.token_ids)} tokens in {seconds:.2f}s, {len(done.token_ids) / max(seconds, 1e-9):.1f} tokens/s, "
          f"finish: {done.finish_reason}]", file=sys.stderr)
    return 0


def cmd_import(args) -> int:
    from ember.model.gguf import import_gguf

    record = import_gguf(args.gguf, args.output, dtype=args.dtype)
    source = record["source"]
    print(f"imported {source['file']} ({source['general.architecture']}, {source['quantization']}, "
          f"SHA-256 {source['sha256'][:12]}…) → {args.output} ({record['dtype']})")
    return 0


def cmd_serve(args) -> int:
    from ember.serve.launch import serve_forever, serve_target

    base, names = serve_target(args.target, address=args.address, detach=args.detach, host=args.host,
                               port=args.port)
    print(f"serving at {base}/v1  (OpenAI API: GET /v1/models, POST /v1/completions, POST /v1/chat/completions)",
          flush=True)
    if not args.detach:
        print("Ctrl-C stops the app", flush=True)
        serve_forever(names)
    return 0


def cmd_submit(args) -> int:
    from ember.cluster.jobs import submit

    _, status = submit(args.spec, args.overrides, address=args.address, env=args.env, workdir=args.workdir,
                       wait=args.wait)
    return 0 if status in (None, "SUCCEEDED") else 1


def cmd_jobs_list(args) -> int:
    from ember.cluster.jobs import Jobs, format_jobs, list_jobs

    print(format_jobs(list_jobs(Jobs(args.address), ember_only=args.ember)))
    return 0


def cmd_jobs_status(args) -> int:
    from ember.cluster.jobs import Jobs, describe

    print(describe(Jobs(args.address), args.job_id))
    return 0


def cmd_jobs_logs(args) -> int:
    from ember.cluster.jobs import Jobs

    client = Jobs(args.address)
    if args.follow:
        client.follow(args.job_id)
    else:
        sys.stdout.write(client.call("get_job_logs", args.job_id))
    return 0


def cmd_jobs_stop(args) -> int:
    from ember.cluster.jobs import TERMINAL, Jobs

    client = Jobs(args.address)
    status = str(client.info(args.job_id).status)
    if status in TERMINAL:
        print(f"job {args.job_id} already ended: {status}")
        return 0
    client.call("stop_job", args.job_id)
    info = client.wait(args.job_id, timeout=60)
    print(f"job {args.job_id}: {info.status}")
    return 0 if str(info.status) in TERMINAL else 1


def cmd_demo(args) -> int:
    from ember.demo import Demo, parse_overrides

    Demo(parse_overrides(args.overrides), address=args.address, port=args.port,
         keep_serving=args.keep_serving).run()
    return 0


def cmd_report(args) -> int:
    from ember.runs.report import write_report

    print(write_report(args.run_dir, args.eval))
    return 0


def cmd_status(args) -> int:
    from ember.cluster.status import render

    print(render(args.address))
    return 0


def _cluster_dir(args) -> Path | None:
    return Path(args.dir) if args.dir else None


def cmd_cluster_up(args) -> int:
    from ember.cluster.local import up

    info = up(args.workers, args.cpus_per_node, directory=_cluster_dir(args), port=args.port,
              dashboard_port=args.dashboard_port, head_cpus=args.head_cpus, max_workers=args.max_workers)
    scaling = f", autoscaling to {info.max_workers}" if info.max_workers is not None else ""
    ray_env = " ".join(f"{k}={v}" for k, v in {ADDRESS_ENV[GCS][0]: info.address, **TOKEN_AUTH_ENV,
                                               **LOOPBACK_NODE_ENV}.items())
    print(f"local Ray cluster up: head + {info.workers} worker nodes (separate raylets){scaling}, token auth on\n"
          f"  dashboard:   {info.dashboard_url}\n"
          f"  address:     {info.address}   (ember run --address / ember serve --address)\n"
          f"  submit jobs: ember submit jobs/tokenize-demo.yaml --wait   (uses this cluster by default)\n"
          f"  metrics:     Prometheus targets in {info.service_discovery_file}\n"
          f"  Ray's own CLI: export {ray_env}\n"
          f"  stop it:     ember cluster down")
    return 0


def cmd_cluster_status(args) -> int:
    from ember.cluster.local import read_state

    info = read_state(_cluster_dir(args))
    if info is None:
        print("no local cluster is running (`ember cluster up` starts one)")
        return 1
    from ember.cluster.status import render

    print(render(info.dashboard_url))
    return 0


def cmd_cluster_down(args) -> int:
    from ember.cluster.local import down

    info = down(_cluster_dir(args))
    print("no local cluster was running" if info is None else
          f"local cluster stopped ({info.address}); its logs stay in {info.session_dir}/logs")
    return 0


def _setup_logging(debug: bool) -> None:
    handler = logging.StreamHandler(sys.stdout)
    handler.setFormatter(logging.Formatter("%(message)s"))
    logger = logging.getLogger("ember")
    logger.handlers[:] = [handler]
    logger.setLevel(logging.DEBUG if debug else logging.INFO)
    logger.propagate = False


def _use_address_form(args) -> None:
    """Puts the cluster's address (`ember.connection.cluster_address`) in the form the verb needs, and says on
    stderr which address it used when it had to find that form (ember.cluster.address)."""
    form = address_form(args.verb)
    if form not in (GCS, DASHBOARD):
        return
    given = cluster_address(args.address, form)
    if not given:
        return
    from ember.cluster.address import in_form
    from ember.cluster.local import read_state

    found = in_form(given, form, read_state())
    if not found.note:
        return
    print(found.line(), file=sys.stderr, flush=True)
    if args.address is None and form == GCS:
        # What Ray and this process's children read, in the form they join.
        os.environ[ADDRESS_ENV[GCS][0]] = found.address
    args.address = found.address


def main(argv: list[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    debug = getattr(args, "debug", False) or debugging()
    if debug:
        os.environ[LOG_LEVEL_ENV] = "DEBUG"  # read by quiet_libraries, here and in every worker
    quiet_libraries()
    address = cluster_address(getattr(args, "address", None), GCS)  # the cluster Ray would join
    use_loopback_node_address(address)  # both before anything imports Ray, which reads them once
    if talks_to_a_cluster(args.verb, address):
        use_token_auth()
    _setup_logging(debug)
    try:
        _use_address_form(args)
        return args.func(args)
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return 130
    except Exception as exc:  # the boundary: one line for the user, the traceback only with --debug
        if debug:
            raise
        found = find_ember_error(exc)
        if found is not None:
            print(f"error: {found}", file=sys.stderr)
        else:
            print(f"error: unexpected {type(exc).__name__}: {exc} (rerun with --debug for the traceback)",
                  file=sys.stderr)
        return 1


if __name__ == "__main__":
    sys.exit(main())
