"""Derive ``lexicon.txt`` (the committed word list of the synthetic corpus). Run by hand, not at run time.

Why a derived file: the corpus must be generated offline from files in the repo, but a few thousand
words with parts of speech, inflections and frequencies are too many to type. This script documents
how the committed file was made so it can be re-made or extended; the corpus only reads the output.

Sources (tools needed only to re-run this script, not by asrflow itself):
  * word frequencies: the ``wordfreq`` package (3.1.1), English Zipf values;
  * parts of speech: WordNet 3.0 sense tag counts (Debian ``wordnet-base``: cntlist.rev);
  * inflections: the ``lemminflect`` package (0.2.3), each form checked against the Debian
    ``wamerican`` word list (/usr/share/dict/american-english);
  * pronounceability: every word form is read by ``espeak-ng -x``; forms that espeak spells out
    letter by letter or reads as something else (Roman numerals, abbreviations) are dropped.

Output: tab-separated ``lemma  pos  zipf  forms`` where pos is noun|verb|adj|adv and forms is
noun: ``singular,plural``; verb: ``base,3sg,past,gerund,participle``; adj/adv: the word itself.

    python build_lexicon.py > lexicon.txt
"""

from __future__ import annotations

import collections
import re
import subprocess
import sys
from pathlib import Path

import lemminflect
import wordfreq

HERE = Path(__file__).resolve().parent
TARGETS = {"noun": 1700, "verb": 550, "adj": 600, "adv": 120}
WORDNET_POS = {"1": "noun", "2": "verb", "3": "adj", "5": "adj", "4": "adv"}
# closed-class words (used by the sentence templates themselves) and words that make poor sentences
STOP = set(
    """a an the this that these those my your his her its our their some any no every each all both either
    neither i me you he him she it we us they them who whom whose which what where when why how be am is
    are was were been being have has had having do does did done can could will would shall should may
    might must ought not and or but if then so than too very also just only there here to of in on at by
    for with from into onto about over under up down out off as like one two three four five six seven
    eight nine ten hundred thousand million billion first second third oh yeah ok okay hey hi hello yes
    please thanks thank mr mrs ms dr st jr sr etc vs re per via lol gonna wanna gotta ain't im dont while
    someone anyone everyone something anything nothing everything somebody nobody anybody everybody doing
    found many other such same own another few several however therefore thus respectively instead indeed
    ago enough less more most once else rather quite far even already non due ex ad pa ma sec pro mid bob
    don mar eve par ion""".split()
)
# a short block list: offensive, sexual, violent or drug words that do not belong in a demo corpus
BLOCK = set(
    """sex sexy sexual porn porno nude naked fuck fucking shit damn hell bitch ass bastard crap dick cock
    pussy cunt whore slut rape raped kill killed killing murder suicide drug drugs cocaine heroin gay
    lesbian nigger fag retard penis vagina breast breasts boob boobs orgasm erotic gun guns terror
    terrorist bomb bombs weed beer wine vodka whiskey kidnap torture abuse abortion nazi jew jews
    muslim christian god jesus christ bible church prayer satan devil hitler negro""".split()
)


def load_dict() -> set[str]:
    return {w.strip() for w in open("/usr/share/dict/american-english", encoding="utf-8") if w.strip()}


def wordnet_counts() -> dict[str, collections.Counter]:
    counts: dict[str, collections.Counter] = collections.defaultdict(collections.Counter)
    for line in open("/usr/share/wordnet/cntlist.rev", encoding="utf-8"):
        key, _sense, cnt = line.split()
        lemma, rest = key.split("%", 1)
        counts[lemma][WORDNET_POS[rest[0]]] += int(cnt)
    return counts


def espeak_ok(words: list[str]) -> set[str]:
    """The words espeak-ng reads as one ordinary word (no spelling out, no Roman numerals)."""
    text = "".join(f"{w}.\n" for w in words)
    out = subprocess.run(["espeak-ng", "-q", "-x"], input=text, capture_output=True, text=True, check=True)
    lines = [ln.strip() for ln in out.stdout.splitlines() if ln.strip()]
    if len(lines) != len(words):
        raise RuntimeError(f"espeak-ng gave {len(lines)} clauses for {len(words)} words")
    ok = set()
    for w, ph in zip(words, lines, strict=True):
        stresses = ph.count("'") + ph.count(",")
        if "_" in ph or " " in ph or "r,oUm@n" in ph or stresses > max(2, len(w) // 3):
            print(f"espeak drops {w!r}: {ph}", file=sys.stderr)
            continue
        ok.add(w)
    return ok


def main() -> None:
    words = load_dict()
    counts = wordnet_counts()
    entries = []
    for w in wordfreq.top_n_list("en", 40000):
        if not re.fullmatch(r"[a-z]{2,}", w) or w in STOP or w in BLOCK or w not in words:
            continue
        c = counts.get(w)
        if not c:
            continue
        pos, n = c.most_common(1)[0]
        if n < 3 or n < 0.5 * sum(c.values()):
            continue
        if pos == "noun":
            pl = lemminflect.getInflection(w, "NNS")
            if not pl or pl[0] == w or pl[0] not in words:
                continue
            forms = [w, pl[0]]
        elif pos == "verb":
            forms = [w]
            for tag in ("VBZ", "VBD", "VBG", "VBN"):
                f = lemminflect.getInflection(w, tag)
                forms.append(f[0] if f else "")
            if not all(f and f in words for f in forms):
                continue
        elif pos == "adv" and not (w.endswith("ly") or counts[w]["adv"] > 50):
            continue
        else:
            forms = [w]
        entries.append((w, pos, wordfreq.zipf_frequency(w, "en"), forms))
    # participles listed as adjectives ("made", "based", "looking") read badly before a noun
    verb_forms = {f for e in entries if e[1] == "verb" for f in e[3][1:]}
    entries = [e for e in entries if not (e[1] == "adj" and e[0] in verb_forms)]
    all_forms = sorted({f for e in entries for f in e[3]})
    good = espeak_ok(all_forms)
    taken: collections.Counter = collections.Counter()
    seen = set()
    print("# lemma\tpos\tzipf\tforms   (made by build_lexicon.py; see its docstring)")
    for lemma, pos, zipf, forms in entries:
        if lemma in seen or taken[pos] >= TARGETS[pos] or not all(f in good for f in forms):
            continue
        seen.add(lemma)
        taken[pos] += 1
        print(f"{lemma}\t{pos}\t{zipf:.2f}\t{','.join(forms)}")
    print(dict(taken), file=sys.stderr)


if __name__ == "__main__":
    main()
