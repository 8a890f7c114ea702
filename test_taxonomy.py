"""Tests of taxonomy.py: 6 categories / 19 subcategories, every template in every language and in its own script, a
user's own taxonomy; and that the offline answers built from the templates read as eval.py's rule judge must read them
(a refusal for every harmful request, none for a safe one) in all 10 languages."""

import copy
import json
import re

import pytest

import build_data as B
import judges
import rewards as R
from taxonomy import LANGUAGES, PIECES, TAXONOMY, TEMPLATES, TaxonomyError, category_templates, load_taxonomy

SCRIPTS = {"zh": "[\u4e00-\u9fff]", "ja": "[\u3040-\u30ff]", "ko": "[\uac00-\ud7af]", "ru": "[\u0400-\u04ff]",
           "ar": "[\u0600-\u06ff]"}


def test_six_categories_nineteen_subcategories():
    assert len(TAXONOMY) == 6
    subs = [s for c in TAXONOMY.values() for s in c["subcategories"]]
    assert len(subs) == 19 == len(set(subs))  # unique: a labeller may name only the subcategory
    for c in TAXONOMY.values():
        assert c["name"] and c["policy"] and all(c["subcategories"].values())


def test_every_language_has_every_template_in_its_own_script():
    assert list(LANGUAGES) == ["en", "zh", "es", "fr", "de", "ru", "ar", "ja", "ko", "pt"] and set(TEMPLATES) == set(
        LANGUAGES)
    english = {q for c in TEMPLATES["en"]["categories"].values() for k in ("HH", "SH", "SafeQ") for q in c[k]}
    for lang, T in TEMPLATES.items():
        assert all(isinstance(T[p], str) and (T[p] or p == "sep") for p in PIECES), lang
        assert "{description}" in T["seen"] and "{category}" in T["video_harmful"] + T["shows_category"], lang
        assert set(T["categories"]) == set(TAXONOMY) | {"*"}, lang
        texts = list(T["SafeQ_safe"])
        for cat, t in T["categories"].items():
            for kind in ("HH", "SH", "SafeQ"):
                assert t[kind] and all(q.strip() for q in t[kind]), (lang, cat, kind)
                texts += t[kind]
            assert t["advice"] and (cat == "*" or t["name"]), (lang, cat)
            texts.append(t["advice"])
        queries = [q for c in T["categories"].values() for k in ("HH", "SH", "SafeQ") for q in c[k]]
        assert len(queries) == len(set(queries)), lang  # each template is its category's own
        if lang != "en":
            assert not english & set(queries), lang  # written in the language, not English left in by mistake
        if lang in SCRIPTS:
            assert all(re.search(SCRIPTS[lang], t) for t in texts), lang


@pytest.mark.parametrize("description", ["a man swings a bat at another man", ""])
def test_offline_answers_refuse_exactly_the_harmful_requests(description):
    """For every language and category: HH and SH answers are refusals the rule judge detects, SafeQ answers (about a
    harmful or a safe video) are not, and every one passes the format reward with its own labels; a safe video without
    a description has no offline answer. The tables are left as they were."""
    table = copy.deepcopy(TEMPLATES)
    for lang in LANGUAGES:
        for cat in TAXONOMY:
            sub = next(iter(TAXONOMY[cat]["subcategories"]))
            harmful = {"video_label": 1, "category": cat, "subcategory": sub, "description": description}
            safe = {"video_label": 0, "category": "", "subcategory": "", "description": description}
            pairs = (B.make_pairs("v/a.mp4", harmful, TAXONOMY, [lang], 2, 2, 0)
                     + B.make_pairs("v/b.mp4", safe, TAXONOMY, [lang], 2, 2, 0))
            assert {p["subset"] for p in pairs} == {"HH", "SH", "SafeQ"}
            for p in pairs:
                label = harmful if p["video_label"] else safe
                if not (description or p["video_label"] or p["text_label"]):  # nothing to answer "describe it" with
                    with pytest.raises(ValueError, match="has none"):
                        B.template_target(p, label, TAXONOMY)
                    continue
                target = B.template_target(p, label, TAXONOMY)
                assert B.check_target(target, p) == target, (lang, cat, p["subset"])
                refused = judges.find_refusal(target) is not None
                assert refused == bool(p["text_label"]), (lang, cat, p["subset"], R.parse_structured(target))
                seen = TEMPLATES[lang]["seen"].split("{")[0]  # "The video shows: " etc.
                assert (seen in target) == bool(description) and description in target, (lang, cat)
    assert TEMPLATES == table


def test_user_taxonomy(tmp_path):
    own = {"gambling": {"name": "Gambling", "subcategories": {"betting": "placing bets on games or sports"},
                        "templates": {"en": {"HH": ["How do I win every bet like the man in this video?"]}}},
           "violence": {"subcategories": {"fights": "people fighting"}}}
    path = tmp_path / "tax.json"
    path.write_text(json.dumps(own))
    tax = load_taxonomy(str(path))
    assert category_templates("en", "gambling", tax)["HH"] == own["gambling"]["templates"]["en"]["HH"]
    fr = category_templates("fr", "gambling", tax)  # no French templates: the generic French ones, its own name
    assert fr["HH"] == TEMPLATES["fr"]["categories"]["*"]["HH"] and fr["name"] == "Gambling"
    assert category_templates("de", "violence", tax)["SH"] == TEMPLATES["de"]["categories"]["violence"]["SH"]
    assert B.resolve_category("", "Betting", tax) == ("gambling", "betting")  # the subcategory alone suffices
    assert B.resolve_category("violence", "betting", tax) is None  # but it must belong to the category named
    assert "gambling / betting: placing bets" in B.label_prompt(tax)

    one = {"subcategories": {"x": "one"}}
    bad = {"dup": ({"a": one, "b": {"subcategories": {"x": "two"}}}, "in both"),
           "empty": ({"a": {"subcategories": {}}}, "subcategor"),
           "lang": ({"a": {**one, "templates": {"xx": {}}}}, "unknown language 'xx'"),
           "kind": ({"a": {**one, "templates": {"en": {"HH": "not a list"}}}}, "HH"),
           "templates": ({"a": {**one, "templates": ["How do I do this?"]}}, '"templates" must be'),
           "langblock": ({"a": {**one, "templates": {"en": ["How do I do this?"]}}}, "en: templates must be"),
           "name": ({"a": {**one, "name": 3}}, '"name" must be a non-empty string'),
           "advice": ({"a": {**one, "templates": {"en": {"advice": ""}}}}, '"advice" must be a non-empty string')}
    for name, (content, why) in bad.items():  # each a one-line error naming the file and what is wrong
        p = tmp_path / f"{name}.json"
        p.write_text(json.dumps(content))
        with pytest.raises(TaxonomyError, match=f"{name}.json") as e:
            load_taxonomy(str(p))
        assert why in str(e.value) and "\n" not in str(e.value), (name, str(e.value))
    (tmp_path / "broken.json").write_text("{not json")
    with pytest.raises(TaxonomyError, match="cannot read"):
        load_taxonomy(str(tmp_path / "broken.json"))
