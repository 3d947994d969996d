"""The node-count chart's geometry and the create form's translation, on plain values (no database)."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta

from django.http import QueryDict

from frontend.charts import HEIGHT, Interval, node_chart
from frontend.forms import ClusterForm

T0 = datetime(2026, 1, 1, 12, 0, tzinfo=UTC)


def at(seconds: float) -> datetime:
    return T0 + timedelta(seconds=seconds)


def polygon_heights(points: str) -> list[float]:
    return [float(p.split(",")[1]) for p in points.split()]


def test_groups_stack_in_the_given_order_and_the_peak_sets_the_scale() -> None:
    # given a head for the whole hour, and two workers that overlap for the middle 20 minutes
    intervals = [
        Interval("head", at(0), None),
        Interval("cpu", at(600), at(3000)),
        Interval("cpu", at(1200), at(2400)),
    ]

    chart = node_chart(intervals, start=at(0), end=at(3600), order=["head", "cpu"])

    # then head is drawn first (bottom), cpu above it, scaled to the peak of three nodes
    assert [s.group for s in chart.series] == ["head", "cpu"]
    assert [(s.now, s.peak) for s in chart.series] == [(1, 1), (0, 2)]
    assert [t.label for t in chart.y_ticks] == ["0", "1", "2", "3"]
    assert min(polygon_heights(chart.series[1].points)) == 0  # cpu's band reaches the top at the peak
    assert max(polygon_heights(chart.series[0].points)) == HEIGHT
    assert "now head 1, cpu 0; at most 3 at once" in chart.summary


def test_time_ticks_fall_on_round_times_within_the_window() -> None:
    chart = node_chart([Interval("head", at(0), None)], start=at(0), end=at(3600))
    labels = [t.label for t in chart.x_ticks]
    assert labels == ["12:00", "12:10", "12:20", "12:30", "12:40", "12:50", "13:00"]
    assert [t.pos for t in chart.x_ticks][::3] == [0, 50, 100]  # percent of the width


def test_a_cluster_without_nodes_has_an_empty_chart() -> None:
    chart = node_chart([], start=at(0), end=at(5))
    assert chart.empty and chart.summary == "No nodes yet."


def test_a_young_cluster_gets_a_short_window_from_its_creation() -> None:
    chart = node_chart([Interval("head", at(1), None)], start=at(0), end=at(2))
    assert chart.x_ticks[0].label == "12:00:00" and chart.x_ticks[-1].label == "12:00:10"


def test_nodes_outside_their_group_list_still_count() -> None:
    # a group removed from the spec keeps its nodes' history (group_name stays on the node rows)
    chart = node_chart([Interval("old", at(0), at(30)), Interval("head", at(0), None)], start=at(0), end=at(60),
                       order=["head"])
    assert [s.group for s in chart.series] == ["head", "old"]


def form_post(**fields: str | list[str]) -> QueryDict:
    data = QueryDict(mutable=True)
    for key, value in fields.items():
        data.setlist(key.replace("__", "-"), value if isinstance(value, list) else [value])
    return data


def test_the_form_posts_json_types_and_leaves_out_what_is_empty() -> None:
    form = ClusterForm.from_post(form_post(
        name="web", provider="local", head_instance_type="local.small", wg=["2", "0"],
        wg__0__name="b", wg__0__instance_type="local.gpu", wg__0__min_workers="", wg__0__max_workers="1",
        wg__2__name="a", wg__2__instance_type="local.small", wg__2__min_workers="1", wg__2__max_workers="x",
        wg__2__spot="on", idle_timeout_minutes="2.5", auto_stop_minutes="",
    ))

    spec = form.spec()

    assert spec["worker_groups"] == [  # in the order the page showed them
        {"name": "a", "instance_type": "local.small", "spot": True, "min_workers": 1, "max_workers": "x"},
        {"name": "b", "instance_type": "local.gpu", "spot": False, "max_workers": 1},
    ]
    assert spec["idle_timeout_minutes"] == 2.5 and spec["auto_stop_minutes"] is None


def test_spec_errors_land_on_the_row_they_name() -> None:
    form = ClusterForm.from_post(form_post(wg=["5", "9"], wg__5__name="a", wg__9__name="b"))

    form.set_errors({"name": ["bad"], "head": {"instance_type": ["unknown"]},
                     "worker_groups": {1: {"max_workers": ["required"], "extra": ["odd"]}}})

    assert form.errors == {"name": ["bad"], "head_instance_type": ["unknown"], "worker_groups": ["odd"]}
    assert [g.errors for g in form.groups] == [{}, {"max_workers": ["required"]}]


def test_adding_a_group_picks_a_free_name_and_removing_keeps_the_others() -> None:
    form = ClusterForm.initial()
    added = form.add_group()
    third = form.add_group()
    form.remove_group(added.key)
    assert [g.name for g in form.groups] == ["cpu", "group-3"] and third.key == 2
