"""`velotune dashboard` in a real browser: Debian's headless Chromium, driven by Selenium through chromedriver,
against a dashboard serving runs this module trains (tiny Llama, a few steps each) plus one it writes as a run
would while the page watches.

With VELOTUNE_SCREENSHOTS=DIR the runs list, a run page and the compare view are saved there as PNGs (the README's
pictures: `VELOTUNE_SCREENSHOTS=docs/dashboard python -m pytest tests/dashboard`).
"""

from __future__ import annotations

import http.client
import json
import os
import shutil
import time
from pathlib import Path

import pytest
from selenium import webdriver
from selenium.webdriver.chrome.service import Service
from selenium.webdriver.common.by import By
from selenium.webdriver.support.ui import Select, WebDriverWait

from velotune.cli.main import main
from velotune.dashboard.serve import Dashboard
from velotune.train.config import PACKAGE_DATA
from velotune.train.report import MetricsLog
from velotune.train.status import write_status

CHROMIUM, CHROMEDRIVER = "/usr/bin/chromium", "/usr/bin/chromedriver"
# the probe's flags: headless as root, and nothing that reaches for the network
CHROMIUM_FLAGS = (
    "--headless=new --no-sandbox --disable-gpu --disable-quic --no-first-run --disable-background-networking "
    "--disable-component-update --disable-sync --disable-dev-shm-usage --window-size=1400,1000"
).split()
WAIT_S = 20


def _train(out: Path, model_dir: Path, *extra: str, faults: str = "") -> int:
    args = ["train", "--model", str(model_dir), "--dataset", str(PACKAGE_DATA / "iso_dates_eval.jsonl")]
    args += ["--output_dir", str(out), "--no_progress", "--per_device_train_batch_size", "2", *extra]
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("VELOTUNE_FAULTS", faults)
        # as tests/conftest.py's fixture does for each test (a module fixture runs before it)
        mp.setenv("VELOTUNE_CACHE", str(out.parent.parent / "velotune-cache"))
        return main(args)


def _train_rows(run: Path) -> list[dict]:
    rows = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    return [r for r in rows if "loss" in r and "skipped" not in r]


@pytest.fixture(scope="module")
def runs(tiny_model_dir, tmp_path_factory):
    """A runs directory: two finished runs (different learning rates), an interrupted one, a failed one, one with a
    corrupt config, and `live`, which the tests extend while the page watches."""
    root = tmp_path_factory.mktemp("runs")
    eval_args = ("--eval_dataset", str(PACKAGE_DATA / "iso_dates_eval.jsonl"), "--eval_steps", "2")
    short = ("--compare_samples", "2", "--max_new_tokens", "6", "--save_steps", "2")
    assert (
        _train(root / "run-a", tiny_model_dir, "--max_steps", "4", "--learning_rate", "1e-2", *eval_args, *short) == 0
    )
    assert (
        _train(root / "run-b", tiny_model_dir, "--max_steps", "3", "--learning_rate", "3e-3", "--compare_samples", "0")
        == 0
    )
    quick = ("--max_steps", "4", "--compare_samples", "0")
    assert _train(root / "stopped", tiny_model_dir, *quick, faults="signal@2:TERM") == 128 + 15
    assert _train(root / "diverged", tiny_model_dir, *quick, "--max_bad_steps", "1", faults="nonfinite@1") == 2
    corrupt = root / "corrupt"
    shutil.copytree(root / "run-b", corrupt, ignore=shutil.ignore_patterns("adapter", "checkpoint-*"))
    (corrupt / "config.yaml").write_text("model_name_or_path: [unclosed\n  learning_rate: : 3\n")
    live = root / "live"
    live.mkdir()
    shutil.copy(root / "run-a" / "config.yaml", live / "config.yaml")
    write_status(live, "running", planned_gpu_memory_gib=1.5)  # this process: alive while the tests run
    log = MetricsLog(live / "metrics.jsonl")
    for step in (1, 2, 3):  # as a CUDA GRPO step writes them
        row = {"step": step, "loss": 3.0 - 0.2 * step, "lr": 1e-3, "grad_norm": 1.0, "tokens": 100 * step}
        log.write(row | {"reward": 0.1 * step, "kl": 0.01 * step, "gpu_memory_gib": 1.2 + 0.01 * step})
    log.write({"step": 3, "warning": "grad_norm", "message": "gradient norm 12.0 at step 3 is above 10"})
    log.file.write('{"step": 4, "this line is broken\n{"step": 4, "loss": 2.')  # a bad line, then half a line
    log.file.flush()
    yield root
    log.close()


@pytest.fixture(scope="module")
def dashboard(runs):
    board = Dashboard(runs, port=0)
    board.start()
    yield board
    board.stop()


@pytest.fixture(scope="module")
def browser():
    options = webdriver.ChromeOptions()
    options.binary_location = CHROMIUM
    for flag in CHROMIUM_FLAGS:
        options.add_argument(flag)
    driver = webdriver.Chrome(service=Service(CHROMEDRIVER), options=options)
    yield driver
    driver.quit()


def _wait(driver, condition, what: str):
    return WebDriverWait(driver, WAIT_S).until(lambda d: condition(d), message=f"waited {WAIT_S} s for {what}")


def _open(driver, board: Dashboard, fragment: str) -> None:
    driver.get(board.url + fragment)


def _screenshot(driver, name: str, tmp_path: Path) -> None:
    """Saved under VELOTUNE_SCREENSHOTS when set (the README's pictures), else in the test's temp dir."""
    out = Path(os.environ.get("VELOTUNE_SCREENSHOTS") or tmp_path)
    out.mkdir(parents=True, exist_ok=True)
    driver.execute_script("window.scrollTo(0, 0)")
    driver.set_window_size(1400, max(900, driver.execute_script("return document.body.scrollHeight") + 40))
    time.sleep(0.3)  # charts redraw at the new size
    assert driver.save_screenshot(str(out / f"{name}.png"))
    driver.set_window_size(1400, 1000)


def _points(driver, key: str) -> list[int]:
    text = driver.find_element(By.ID, f"chart-{key}").get_attribute("data-points") or ""
    return [int(n) for n in text.split(",") if n]


def test_runs_list_shows_each_run_with_its_status(dashboard, browser, runs, tmp_path):
    _open(browser, dashboard, "")
    _wait(browser, lambda d: len(d.find_elements(By.CSS_SELECTOR, "#runs tr[data-run]")) == 6, "six runs")
    status = {
        row.get_attribute("data-run"): row.get_attribute("data-status")
        for row in browser.find_elements(By.CSS_SELECTOR, "#runs tr[data-run]")
    }
    assert status == {
        "run-a": "finished",
        "run-b": "finished",
        "stopped": "interrupted",
        "diverged": "failed",
        "live": "running",
        "corrupt": "finished",
    }
    stopped = browser.find_element(By.CSS_SELECTOR, 'tr[data-run="stopped"]').text  # with the command that resumes
    assert "velotune train --model" in stopped and f"--output_dir {runs / 'stopped'} --resume" in stopped
    assert "non-finite" in browser.find_element(By.CSS_SELECTOR, 'tr[data-run="diverged"]').text
    assert "config.yaml is not valid YAML" in browser.find_element(By.CSS_SELECTOR, 'tr[data-run="corrupt"]').text
    run_a = browser.find_element(By.CSS_SELECTOR, 'tr[data-run="run-a"]').text
    assert "4 / 4" in run_a and "sft" in run_a
    _screenshot(browser, "runs-list", tmp_path)


def test_run_page_charts_the_metrics_file(dashboard, browser, runs, tmp_path):
    _open(browser, dashboard, "#/run/run-a")
    expected = len(_train_rows(runs / "run-a"))
    assert expected == 4
    _wait(browser, lambda d: _points(d, "loss") == [expected], f"{expected} loss points")
    evals = sum(1 for line in (runs / "run-a" / "metrics.jsonl").read_text().splitlines() if "eval_loss" in line)
    assert _points(browser, "eval_loss") == [evals] and evals >= 2
    assert _points(browser, "lr") == [expected] and _points(browser, "grad_norm") == [expected]
    config = browser.find_element(By.CSS_SELECTOR, "#config pre").text
    assert "learning_rate: 0.01" in config
    assert "iso_dates_eval.jsonl" in browser.find_element(By.ID, "data-report").text  # the run's data report
    checkpoints = browser.find_elements(By.CSS_SELECTOR, "#checkpoints tr[data-checkpoint]")
    assert [c.get_attribute("data-checkpoint") for c in checkpoints] == ["checkpoint-2", "checkpoint-4"]
    best = json.loads((runs / "run-a" / "checkpoint-4" / "trainer_state.json").read_text())["best_checkpoint"]
    assert [c.get_attribute("data-checkpoint") for c in checkpoints if c.find_elements(By.CSS_SELECTOR, ".best")] == [
        best
    ]
    before_after = browser.find_element(By.ID, "before-after").text
    summary = json.loads((runs / "run-a" / "summary.json").read_text())
    assert summary["held_out"][0]["prompt"] in before_after
    commands = browser.find_element(By.ID, "try-it").text
    assert f"velotune export {runs / 'run-a'} --quant q4_k_m" in commands
    assert f"velotune export {runs / 'run-a'} --format hf" in commands


def test_live_run_gains_points_as_metrics_are_written(dashboard, browser, runs):
    live = runs / "live"
    _open(browser, dashboard, "#/run/live")
    _wait(browser, lambda d: _points(d, "loss") == [3], "the 3 complete loss rows")
    assert browser.find_element(By.CSS_SELECTOR, "#run-name + .status").text == "running"
    assert "1 malformed line of metrics.jsonl skipped" in browser.find_element(By.ID, "bad-lines").text
    assert browser.find_element(By.ID, "chart-loss").get_attribute("data-notices") == "1"
    assert "gradient norm 12.0" in browser.find_element(By.ID, "notices").text
    assert _points(browser, "reward") == [3] and _points(browser, "kl") == [3]
    assert _points(browser, "gpu_memory") == [3, 3]  # the peak per step, and the planner's prediction beside it
    with open(live / "metrics.jsonl", "a") as f:  # the trainer finishes the half-written line ...
        f.write('5, "lr": 0.001, "grad_norm": 1.0, "tokens": 400}\n')
    log = MetricsLog(live / "metrics.jsonl")  # ... and writes on, as it does (the same writer)
    log.write({"step": 5, "loss": 2.1, "lr": 1e-3, "grad_norm": 1.0, "tokens": 500})
    log.write({"step": 5, "skipped": "non-finite loss", "rows": ["data.jsonl:3"]})
    log.close()
    _wait(browser, lambda d: _points(d, "loss") == [5], "5 loss points after the run wrote 2 more")
    assert browser.find_element(By.ID, "chart-loss").get_attribute("data-notices") == "2"
    assert "step skipped: non-finite loss" in browser.find_element(By.ID, "notices").text


def test_compare_overlays_two_runs_and_lists_their_differences(dashboard, browser, runs, tmp_path):
    _open(browser, dashboard, "")
    _wait(browser, lambda d: d.find_elements(By.CSS_SELECTOR, 'tr[data-run="run-a"] input'), "the runs list")
    for name in ("run-a", "run-b"):
        browser.find_element(By.CSS_SELECTOR, f'tr[data-run="{name}"] input[type=checkbox]').click()
    browser.find_element(By.ID, "compare").click()
    want = [len(_train_rows(runs / "run-a")), len(_train_rows(runs / "run-b"))]
    assert want == [4, 3]
    _wait(browser, lambda d: d.find_elements(By.ID, "chart-loss") and _points(d, "loss") == want, "both loss curves")
    assert browser.find_element(By.ID, "chart-loss").get_attribute("data-series") == "2"
    rows = browser.find_elements(By.CSS_SELECTOR, "#config-diff tr[data-key]")
    differences = {r.get_attribute("data-key"): r.text for r in rows}
    assert "0.01" in differences["learning_rate"] and "0.003" in differences["learning_rate"]
    assert set(differences) >= {"learning_rate", "max_steps"} and "lora_r" not in differences
    _screenshot(browser, "compare", tmp_path)


def test_chat_pane_answers_with_the_trained_model(dashboard, browser, runs, capsys, tmp_path):
    prompt = "Write May 1, 2000 as an ISO date."
    assert main(["generate", str(runs / "run-a"), "--prompt", prompt, "--max_new_tokens", "8"]) == 0
    expected = capsys.readouterr().out.strip()
    _open(browser, dashboard, "#/run/run-a")
    _wait(browser, lambda d: d.find_elements(By.ID, "chat-input"), "the chat pane")
    options = [o.get_attribute("value") for o in browser.find_elements(By.CSS_SELECTOR, "#chat-model option")]
    assert options == ["", "checkpoint-4", "checkpoint-2"]  # the final model first, then the checkpoints
    box = browser.find_element(By.ID, "chat-max-tokens")
    box.clear()
    box.send_keys("8")
    browser.find_element(By.ID, "chat-input").send_keys(prompt)
    browser.find_element(By.ID, "chat-send").click()
    answer = _wait(
        browser, lambda d: d.find_elements(By.CSS_SELECTOR, "#chat-log .msg.assistant:not(.pending)"), "an answer"
    )
    assert answer[0].get_attribute("textContent").strip() == expected and expected
    # checkpoint-4 holds the weights of the last step, so its answer is the trained model's too (loaded another way)
    Select(browser.find_element(By.ID, "chat-model")).select_by_value("checkpoint-4")
    browser.find_element(By.ID, "chat-input").send_keys(prompt)
    browser.find_element(By.ID, "chat-send").click()
    answer = _wait(
        browser, lambda d: d.find_elements(By.CSS_SELECTOR, "#chat-log .msg.assistant:not(.pending)"), "an answer"
    )
    assert len(answer) == 1 and answer[0].get_attribute("textContent").strip() == expected
    _screenshot(browser, "run", tmp_path)


def test_chat_is_closed_for_a_run_without_a_model(dashboard, browser):
    _open(browser, dashboard, "#/run/live")  # running, no checkpoint yet
    _wait(browser, lambda d: d.find_elements(By.ID, "try-it"), "the try-it section")
    assert browser.find_elements(By.ID, "chat-unavailable")
    assert not browser.find_elements(By.ID, "chat-input")


def _get(board: Dashboard, path: str, host: str | None = None) -> tuple[int, bytes]:
    conn = http.client.HTTPConnection("127.0.0.1", board.port, timeout=10)
    conn.putrequest("GET", path, skip_host=host is not None)
    if host is not None:
        conn.putheader("Host", host)
    conn.endheaders()
    response = conn.getresponse()
    return response.status, response.read()


def test_path_traversal_is_refused(dashboard, browser, runs, tmp_path):
    outside = tmp_path / "secret.txt"
    outside.write_text("not for the dashboard")
    (runs / "link").symlink_to(tmp_path)
    try:
        for path in (
            "/files/../secret.txt",
            "/files/%2e%2e/%2e%2e/%2e%2e/etc/passwd",
            "/files/..%2f..%2f..%2fetc%2fpasswd",
            "/files/link/secret.txt",  # a symbolic link out of the runs directory
            "/files//etc/passwd",
            "/api/run?run=../..",
            "/api/metrics?run=%2Fetc",
        ):
            status, body = _get(dashboard, path)
            assert status in (403, 404), path
            assert b"not for the dashboard" not in body and b"root:" not in body, path
        assert _get(dashboard, "/files/%2e%2e/secret.txt")[0] == 403
        status, body = _get(dashboard, "/files/run-a/config.yaml")  # what is inside is served
        assert status == 200 and b"learning_rate" in body
    finally:
        (runs / "link").unlink()
    browser.get(f"http://127.0.0.1:{dashboard.port}/files/..%2f..%2f..%2fetc%2fpasswd")  # Chromium keeps %2f
    assert "refused" in browser.find_element(By.TAG_NAME, "body").text


def test_requests_naming_another_host_are_refused(dashboard):
    """On loopback, a page of another site that rebinds its name to 127.0.0.1 gets nothing."""
    assert _get(dashboard, "/api/runs", host="evil.example:80")[0] == 403
    assert _get(dashboard, "/api/runs", host=f"localhost:{dashboard.port}")[0] == 200


def test_empty_directory_shows_an_empty_state(browser, tmp_path):
    board = Dashboard(tmp_path, port=0)
    board.start()
    try:
        browser.get(board.url)
        empty = _wait(
            browser, lambda d: [e for e in d.find_elements(By.ID, "empty") if e.is_displayed()], "the empty state"
        )
        assert f"No runs in {tmp_path.resolve()} yet" in empty[0].text
        assert "velotune train --output_dir" in empty[0].text
    finally:
        board.stop()


def test_token_is_required_when_asked_for(tmp_path):
    board = Dashboard(tmp_path, port=0, always_token=True)
    board.start()
    try:
        assert board.token and f"?token={board.token}" in board.url
        assert _get(board, "/api/runs")[0] == 403
        assert _get(board, "/?token=wrong")[0] == 403
        assert _get(board, f"/api/runs?token={board.token}")[0] == 200
    finally:
        board.stop()
