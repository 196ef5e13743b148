"""Fuzz Keel's whole HTTP API from its own /openapi.json with schemathesis, with an admin and a chat key.

    .venv/bin/python bench/fuzz.py [--max-examples 100] [--database-url postgresql://...]

A real `keel serve` (its models pointed at a FakeUpstream) on a scratch database; `st run` once per key
with the checks `not_a_server_error` (no 5xx) and `error_in_openai_envelope` (bench/fuzz_checks.py: every
4xx in the OpenAI envelope). Prints the cases each run sent and any failure; exits non-zero on one.
Results are in docs/security.md.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import subprocess
import sys
import tempfile
import uuid
from pathlib import Path

import asyncpg
import httpx

from keel.testing import FakeUpstream
from keel.testing.process import KeelProcess

HERE = Path(__file__).resolve().parent


async def _admin(url: str, sql: str) -> None:
    conn = await asyncpg.connect(url, timeout=5)
    try:
        await conn.execute(sql)
    finally:
        await conn.close()


def fuzz(base: str, key: str, examples: int, report: Path) -> tuple[int, int]:
    """Run schemathesis with one key: (test cases sent, failures)."""
    env = {**os.environ, "SCHEMATHESIS_HOOKS": "fuzz_checks", "PYTHONPATH": str(HERE)}
    command = [
        str(Path(sys.executable).with_name("st")),
        "run",
        f"{base}/openapi.json",
        "--header",
        f"Authorization: Bearer {key}",
        "--checks",
        "not_a_server_error,error_in_openai_envelope",
        "--max-examples",
        str(examples),
        "--workers",
        "2",
        "--seed",
        "20261205",
        "--report",
        "ndjson",
        "--report-ndjson-path",
        str(report),
        "--no-color",
    ]
    done = subprocess.run(command, env=env, capture_output=True, text=True, check=False)
    print(done.stdout[-4000:])
    cases = failures = 0
    for line in report.read_text().splitlines():
        event = json.loads(line)
        for name, body in event.items():
            if name == "ScenarioFinished":
                recorder = body.get("recorder", {})
                cases += len(recorder.get("cases", {}))
                for checks in recorder.get("checks", {}).values():
                    failures += sum(1 for check in checks if check.get("status") == "FAILURE")
    return cases, failures


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    parser.add_argument("--max-examples", type=int, default=100, help="per operation and phase")
    parser.add_argument("--database-url", default="postgresql://postgres@127.0.0.1:5432/postgres")
    args = parser.parse_args()

    name = f"keel_fuzz_{uuid.uuid4().hex[:8]}"
    asyncio.run(_admin(args.database_url, f"CREATE DATABASE {name}"))
    database = args.database_url.rsplit("/", 1)[0] + f"/{name}"
    try:
        with FakeUpstream() as fake, tempfile.TemporaryDirectory() as tmp:
            models = {"fake": {"provider": "openai", "base_url": fake.openai_base_url, "model": "fake-gpt"}}
            env = {
                "KEEL_DATABASE_URL": database,
                "KEEL_MODELS": json.dumps(models),
                "KEEL_DEFAULT_MODEL": "fake",
                "KEEL_LOG_LEVEL": "WARNING",
            }
            with KeelProcess(Path(tmp), env) as keel:
                base = keel.base_url.removesuffix("/v1")
                admin = (Path(tmp) / "admin.key").read_text().strip()
                created = httpx.post(
                    f"{base}/v1/keys",
                    json={"scope": "chat", "label": "fuzz"},
                    headers={"Authorization": f"Bearer {admin}"},
                )
                created.raise_for_status()
                chat = created.json()["key"]
                totals = []
                for label, key in (("admin", admin), ("chat", chat)):
                    cases, failures = fuzz(base, key, args.max_examples, Path(tmp) / f"{label}.ndjson")
                    print(f"{label} key: {cases} test cases, {failures} failed checks")
                    totals.append((cases, failures))
                log = keel.log_path.read_text()
                server_errors = [line for line in log.splitlines() if "Traceback" in line]
    finally:
        asyncio.run(_admin(args.database_url, f"DROP DATABASE IF EXISTS {name} WITH (FORCE)"))
    cases = sum(c for c, _ in totals)
    failures = sum(f for _, f in totals)
    print(f"total: {cases} test cases, {failures} failed checks, {len(server_errors)} tracebacks logged")
    sys.exit(1 if failures or server_errors else 0)


if __name__ == "__main__":
    main()
