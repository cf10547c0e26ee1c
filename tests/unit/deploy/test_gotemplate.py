"""deploy/gotemplate.py: the Go-template subset the chart is written in."""

from __future__ import annotations

import pytest

from deploy.gotemplate import TemplateError, render


@pytest.mark.parametrize(
    ("source", "data", "expected"),
    [
        ("{{ .a.b }}", {"a": {"b": 3}}, "3"),
        ("{{ .on }}/{{ .off }}", {"on": True, "off": False}, "true/false"),
        ("{{ .s | quote }}", {"s": 'say "hi"'}, '"say \\"hi\\""'),
        ("{{ quote .n }}", {"n": 8}, '"8"'),
        ('{{ printf "%s-%d%%" .a .b }}', {"a": "x", "b": 2}, "x-2%"),
        ('{{ default "d" .v }}|{{ .w | default "d" }}', {"v": "", "w": "w"}, "d|w"),
        ("{{ mul .a .b }}", {"a": 2, "b": 3}, "6"),
        ('{{ "a_b.json" | trimSuffix ".json" | replace "_" "-" | upper_missing }}', {}, None),
        ('{{ base "x/y/Fleet_A.json" | lower }}', {}, "fleet_a.json"),
        ("{{ toJson .m }}", {"m": {"b": 1, "a": "x"}}, '{"a":"x","b":1}'),
        ("{{ .s | b64enc }}", {"s": "{}"}, "e30="),
        ("{{ if (eq .a 1) }}one{{ end }}", {"a": 1}, "one"),
        ("{{ and .a .b }}|{{ or .a .b }}", {"a": 0, "b": 5}, "0|5"),
    ],
)
def test_actions(source, data, expected):
    if expected is None:
        with pytest.raises(TemplateError, match="unknown function"):
            render(source, data)
    else:
        assert render(source, data) == expected


def test_trim_markers_eat_whitespace_and_newlines_on_their_side_only():
    source = "a:\n  {{- if .x }}\n  b: 1\n  {{- end }}\nc: {{ .c -}}  \n\n d"
    assert render(source, {"x": True, "c": 2}) == "a:\n  b: 1\nc: 2d"
    assert render(source, {"x": False, "c": 2}) == "a:\nc: 2d"


def test_if_else_if_else_chain():
    source = "{{ if .a }}A{{ else if .b }}B{{ else }}C{{ end }}."
    assert [render(source, d) for d in ({"a": 1, "b": 1}, {"a": 0, "b": 1}, {"a": 0, "b": 0})] == ["A.", "B.", "C."]


@pytest.mark.parametrize("falsy", [None, False, 0, "", [], {}])
def test_go_truthiness(falsy):
    assert render("{{ if .v }}t{{ else }}f{{ end }}", {"v": falsy}) == "f"


def test_range_over_list_map_and_until_with_variables_and_root():
    data = {"xs": ["a", "b"], "m": {"z": 1, "y": 2}, "n": 3, "root": "R"}
    assert render("{{ range .xs }}[{{ . }}{{ $.root }}]{{ end }}", data) == "[aR][bR]"
    assert render("{{ range $k, $v := .m }}{{ $k }}={{ $v }};{{ end }}", data) == "y=2;z=1;"
    assert render("{{ range $i, $_ := until (int .n) }}{{ if $i }},{{ end }}{{ $i }}{{ end }}", data) == "0,1,2"
    assert render("{{ range .none }}x{{ else }}empty{{ end }}", {"none": []}) == "empty"


def test_with_rebinds_dot_and_variables_are_block_scoped():
    data = {"cfg": {"k": "v"}, "name": "n"}
    assert render("{{ with .cfg }}{{ .k }}{{ end }}", data) == "v"
    assert render('{{ $x := printf "%s!" .name }}{{ $x }}{{ if true }}{{ $y := 1 }}{{ end }}', data) == "n!"


def test_to_yaml_with_nindent_keeps_nesting():
    out = render("spec:\n  {{- toYaml .m | nindent 2 }}", {"m": {"b": [1, 2], "a": "x"}})
    assert out == "spec:\n  a: x\n  b:\n  - 1\n  - 2"


def test_fields_can_call_methods_with_arguments():
    class Files:
        def Get(self, path):  # noqa: N802
            return f"<{path}>"

    assert render('{{ .Files.Get "a.json" | indent 2 }}', {"Files": Files()}) == "  <a.json>"


@pytest.mark.parametrize(
    ("source", "data", "message"),
    [
        ("{{ .missing }}", {}, "missing"),
        ("{{ .a.b.c }}", {"a": {}}, "nil value"),
        ("{{ .m }}", {"m": {"k": 1}}, "toYaml"),
        ("{{ if .a }}x", {"a": 1}, "unclosed"),
        ("x{{ end }}", {}, "without a block"),
        ("{{ $nope }}", {}, "undefined variable"),
        ('{{ fail "stop here" }}', {}, "stop here"),
        ("{{ .a ! }}", {"a": 1}, "cannot parse"),
    ],
)
def test_errors_are_template_errors(source, data, message):
    with pytest.raises(TemplateError, match=message):
        render(source, data)


def test_comments_render_nothing():
    assert render("a{{/* note */}}b{{- /* trimmed */ -}} c", {}) == "abc"
