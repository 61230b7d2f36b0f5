"""Runs vLLM for tests/integration/test_vllm.py, in the vLLM venv (.venv-vllm), one engine per run.

Usage: driver.py PLAN.json RESULT.json. The plan: ``engine`` (keyword arguments of vllm.LLM), ``prompts`` (lists of
token ids), ``max_tokens``, and ``reloads``: URLs to reload the weights from in place after the first generation
(vLLM's ``reload_weights(weights_path=URL)``), generating again after each. The result: ``tokens`` (one list per
prompt) and ``reloaded`` (the same, per reload), or ``error`` (the exception's class names, outermost first)
and ``message`` when building the engine failed (a reload that fails leaves those in its place in ``reloaded``).
With ``helper`` (``url``, ``kwargs``) instead of ``engine``, the engine comes from stream_st.integrations.vllm.llm.
"""

from __future__ import annotations

import json
import sys
import time
from typing import Any


def generate(llm: Any, prompts: list[list[int]], max_tokens: int) -> list[list[int]]:
    from vllm import SamplingParams, TokensPrompt

    params = SamplingParams(temperature=0.0, max_tokens=max_tokens, ignore_eos=True)
    outputs = llm.generate([TokensPrompt(prompt_token_ids=p) for p in prompts], params, use_tqdm=False)
    return [list(output.outputs[0].token_ids) for output in outputs]


def describe(exc: BaseException) -> dict[str, Any]:
    return {"error": [cls.__name__ for cls in type(exc).__mro__], "message": str(exc)}


def main(plan_path: str, result_path: str) -> None:
    with open(plan_path) as handle:
        plan = json.load(handle)
    result: dict[str, Any] = {}
    try:
        import vllm

        started = time.perf_counter()
        if "helper" in plan:  # stream_st.integrations.vllm.llm(url, **kwargs): small files fetched, then vllm.LLM
            from stream_st.integrations.vllm import llm as stream_st_llm

            llm = stream_st_llm(plan["helper"]["url"], **plan["helper"]["kwargs"])
        else:
            llm = vllm.LLM(**plan["engine"])
        result["engine_s"] = time.perf_counter() - started
        result["tokens"] = generate(llm, plan["prompts"], plan["max_tokens"])
        result["reloaded"] = []
        for url in plan.get("reloads", []):
            try:
                llm.collective_rpc("reload_weights", kwargs={"weights_path": url})
                result["reloaded"].append(generate(llm, plan["prompts"], plan["max_tokens"]))
            except Exception as exc:
                result["reloaded"].append(describe(exc))
    except Exception as exc:  # reported to the test, which checks the class and the message
        result.update(describe(exc))
    with open(result_path, "w") as handle:
        json.dump(result, handle)


if __name__ == "__main__":  # vLLM spawns its engine process, which imports this module again
    main(sys.argv[1], sys.argv[2])
