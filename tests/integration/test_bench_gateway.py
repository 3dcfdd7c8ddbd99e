"""``tfpool bench``'s gateway scenario runs, and reports the gateway's figure beside the
direct client's from the same run. Not timed: the figures only have to exist."""

from __future__ import annotations

from workers import bench
from workers.layouts import candidate_layouts
from workers.placement import cpu_count


def test_gateway_scenario_reports_itself_and_the_direct_client(redis_url: str) -> None:
    # One worker, as a layout of its own: the gateway's figures are the point here.
    figures = bench.run(["mlp-gateway"], redis_url=redis_url, runs=1, seconds=0.5, workers=1,
                        log=lambda _: None)  # fmt: skip

    by_name = {f.scenario: f for f in figures}
    assert list(by_name) == ["mlp-closed-64", "mlp-gateway"]  # the baseline came along
    direct, gateway = by_name["mlp-closed-64"], by_name["mlp-gateway"]
    for f in (direct, gateway):
        assert f.requests > 0 and f.requests_per_s > 0 and f.ratio > 0, f
        assert f.errors == 0, f
    assert gateway.cpu_split_us["gateway"] > 0
    assert gateway.vs_baseline == gateway.rows_per_s / direct.rows_per_s > 0
    assert "x the rows/s of mlp-closed-64 in this run" in bench.render(figures)
    # Compared with the best bare layout of the machine, which the table names.
    assert direct.layout == f"1x{cpu_count()}"  # one worker, the cores its threads
    assert direct.bare_layout in {str(layout) for layout in candidate_layouts(cpu_count())}
    assert f"{direct.bare_layout} b{direct.bare_best_batch}" in bench.render(figures)
