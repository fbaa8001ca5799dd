"""The Grafana dashboard is built by infra/grafana/dashboard.py with the Grafana foundation SDK; no Grafana runs here.

Two checks without Grafana: the committed JSON is exactly the builder's output (it cannot drift from its source), and
the JSON survives a round trip through the SDK's typed dashboard model (`Dashboard.from_json`) with nothing lost: a
key the model does not know, or a panel or query of the wrong type, would be dropped or decoded as something else.
The PyPI package ships no JSON schema (the SDK repository's `dashboard.jsonschema.json` is not in it), so the typed
model is the schema here. The queries themselves are evaluated against a real Prometheus in test_observability.py.
"""

from __future__ import annotations

import importlib.util
import json
import sys

import pytest
from grafana_foundation_sdk.cog.encoder import JSONEncoder
from grafana_foundation_sdk.cog.plugins import register_default_plugins
from grafana_foundation_sdk.models import prometheus, timeseries
from grafana_foundation_sdk.models.dashboard import Dashboard, Panel, RowPanel

from .conftest import ROOT

GRAFANA = ROOT / "infra" / "grafana"


@pytest.fixture(scope="module")
def builder():
    spec = importlib.util.spec_from_file_location("infimm_dashboard", GRAFANA / "dashboard.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # its dataclasses resolve their annotations through sys.modules
    spec.loader.exec_module(module)
    return module


def lost_in(original, decoded, path: str = "") -> list[str]:
    """Paths of values in `original` that `decoded` lacks or changed (extra defaults in `decoded` are fine)."""
    if isinstance(original, dict):
        if not isinstance(decoded, dict):
            return [path or "."]
        return [p for k, v in original.items() for p in lost_in(v, decoded.get(k, _MISSING), f"{path}.{k}")]
    if isinstance(original, list):
        if not isinstance(decoded, list) or len(decoded) != len(original):
            return [path]
        return [
            p for i, (a, b) in enumerate(zip(original, decoded, strict=True)) for p in lost_in(a, b, f"{path}[{i}]")
        ]
    return [] if original == decoded else [path]


_MISSING = object()


def round_trip(data: dict) -> tuple[Dashboard, dict]:
    register_default_plugins()  # panel options and queries decode into their plugin types (timeseries, prometheus)
    model = Dashboard.from_json(data)
    return model, json.loads(JSONEncoder().encode(model))


def test_committed_json_is_the_builders_output(builder):
    committed = (GRAFANA / "infimm-hd.json").read_text()
    assert committed == builder.to_json(), (
        "infra/grafana/infimm-hd.json is stale: run python infra/grafana/dashboard.py"
    )
    assert builder.main(["--check"]) == 0, "the script's own --check disagrees"


def test_dashboard_round_trips_through_the_sdk_model():
    data = json.loads((GRAFANA / "infimm-hd.json").read_text())
    model, decoded = round_trip(data)
    assert not lost_in(data, decoded), f"not representable in the SDK's dashboard model: {lost_in(data, decoded)}"
    rows = [p for p in model.panels if isinstance(p, RowPanel)]
    graphs = [p for p in model.panels if isinstance(p, Panel)]
    assert [r.title for r in rows] == ["Throughput", "Latency", "Errors", "Load", "GPU"], rows
    assert len(graphs) == 16, [g.title for g in graphs]
    for g in graphs:
        assert g.type_val == "timeseries" and isinstance(g.options, timeseries.Options), g.title
        assert g.datasource.uid == "${datasource}" and g.field_config.defaults.unit, g.title
        assert g.targets and all(isinstance(t, prometheus.Dataquery) and t.expr for t in g.targets), g.title
        assert len({t.ref_id for t in g.targets}) == len(g.targets), f"{g.title}: refIds not unique"
    (variable,) = model.templating.list_val
    assert (variable.type_val, variable.name, variable.query) == ("datasource", "datasource", "prometheus"), variable
    assert len({p.id_val for p in model.panels}) == len(model.panels), "panel ids not unique"


def test_round_trip_check_catches_what_the_model_does_not_know():
    data = json.loads((GRAFANA / "infimm-hd.json").read_text())
    data["panels"][1]["targets"][0]["exp"] = data["panels"][1]["targets"][0].pop("expr")  # a typo
    data["panels"][2]["fieldConfig"]["defaults"]["unitt"] = "s"
    _, decoded = round_trip(data)
    assert len(lost_in(data, decoded)) == 2, lost_in(data, decoded)


def test_legends_use_grafana_label_templates():
    """`{{label}}` is Grafana's legend template; `{label}` would show literally."""
    data = json.loads((GRAFANA / "infimm-hd.json").read_text())
    legends = [t["legendFormat"] for p in data["panels"] for t in p.get("targets", [])]
    single = [s for s in legends if "{" in s.replace("{{", "").replace("}}", "")]
    assert not single, single
