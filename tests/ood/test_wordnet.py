"""`xclip vocab wordnet`: NegLabel's candidate words from the WordNet database files (Debian's
wordnet-base layout and nltk_data's), and the WaterBirds config's word lists."""

import json
import zipfile
from pathlib import Path

import pytest

from xclip.cli import main
from xclip.ood.vocabulary import read_words
from xclip.ood.wordnet import WordNetError, find_wordnet, read_wordnet

HEADER = "  1 This software and database is being provided to you, the LICENSEE, by\n  2 Princeton University\n"
# synset lines: offset, lexicographer file number, type, word count (hex), word + lex_id pairs, pointers, gloss
DATA_NOUN = HEADER + (
    "00001740 03 n 01 entity 0 000 | that which is perceived\n"
    "02084071 05 n 03 dog 0 domestic_dog 0 Canis_familiaris 0 000 | a member of the genus Canis\n"
    "02121620 05 n 02 cat 0 true_cat 0 000 | feline mammal\n"
    "03001627 06 n 02 chair 0 seat 0 000 | a seat for one person\n"
    "04122825 06 n 01 seat 1 000 | furniture designed for sitting on\n"
    "13865298 25 n 01 square 0 000 | a plane rectangle with four equal sides\n"
)
DATA_ADJ = HEADER + (
    "00001740 00 a 01 able 0 000 | having the necessary means\n"
    "00002098 00 a 02 unable 0 absent(p) 0 000 | not able\n"
    "02513740 01 a 01 feline 0 000 | of or relating to cats\n"
    "01523567 44 s 01 broken(a) 0 000 | physically separated into pieces\n"
)


@pytest.fixture
def wordnet_dir(tmp_path):
    root = tmp_path / "wordnet"
    root.mkdir()
    (root / "data.noun").write_text(DATA_NOUN, encoding="latin-1")
    (root / "data.adj").write_text(DATA_ADJ, encoding="latin-1")
    return root


def test_lemmas_per_lexicographer_file(wordnet_dir):
    lists = read_wordnet(wordnet_dir)
    assert lists.files == {
        "adj.all": ["able", "unable", "absent"],  # position markers dropped
        "adj.pert": ["feline"],
        "noun.Tops": ["entity"],
        "noun.animal": ["dog", "domestic dog", "Canis familiaris", "cat", "true cat"],  # underscores -> spaces
        "noun.artifact": ["chair", "seat"],  # a lemma once per file
        "noun.shape": ["square"],
        "adj.ppl": ["broken"],
    }
    assert lists.lines() == 14
    assert lists.merged("noun") == [
        "entity",
        "dog",
        "domestic dog",
        "Canis familiaris",
        "cat",
        "true cat",
        "chair",
        "seat",
        "square",
    ]
    assert read_wordnet(wordnet_dir, single_words=True, no_proper_nouns=True).merged("noun") == [
        "entity",
        "dog",
        "cat",
        "chair",
        "seat",
        "square",
    ]


def test_nltk_zip_layout_and_lexnames_file(tmp_path, wordnet_dir):
    archive = tmp_path / "nltk_data" / "corpora" / "wordnet.zip"
    archive.parent.mkdir(parents=True)
    with zipfile.ZipFile(archive, "w") as z:
        z.write(wordnet_dir / "data.noun", "wordnet/data.noun")
        z.write(wordnet_dir / "data.adj", "wordnet/data.adj")
    assert read_wordnet(archive).files == read_wordnet(wordnet_dir).files
    (wordnet_dir / "lexnames").write_text(
        "00\tadj.all\t3\n01\tadj.pert\t3\n03\tnoun.Tops\t1\n05\tnoun.animal\t1\n"
        "06\tnoun.artifact\t1\n25\tnoun.shape\t1\n44\tadj.ppl\t3\n"
    )
    assert read_wordnet(wordnet_dir).files == read_wordnet(archive).files


def test_missing_database_says_how_to_install(tmp_path):
    with pytest.raises(WordNetError, match="apt-get install wordnet-base.*nltk.downloader wordnet"):
        find_wordnet(tmp_path / "nothing")


def test_vocab_command_writes_neglabels_layout_and_the_merged_lists(tmp_path, wordnet_dir, capsys):
    out = tmp_path / "lists"
    main(["vocab", "wordnet", "--source", str(wordnet_dir), "--out", str(out)])
    assert read_words(out / "noun.animal.txt") == ["dog", "domestic dog", "Canis familiaris", "cat", "true cat"]
    assert read_words(out / "nouns.txt")[:2] == ["entity", "dog"] and len(read_words(out / "nouns.txt")) == 9
    assert read_words(out / "adjectives.txt") == ["able", "unable", "absent", "feline", "broken"]
    counts = json.loads((out / "counts.json").read_text())
    assert counts["lines"] == 14 and counts["neglabel_lines"] == 79_455
    assert "14 lines" in capsys.readouterr().out


@pytest.mark.skipif(
    not Path("/usr/share/wordnet/data.noun").is_file(), reason="needs Debian's wordnet-base (.ci/run installs it)"
)
def test_the_real_wordnet_counts():
    lists = read_wordnet("/usr/share/wordnet")
    # WordNet 3.0: 117,798 noun and 21,479 adjective lemmas in index.noun / index.adj; the data
    # files' lemmas differ from those only in case variants and adjective markers
    assert len(lists.files) == 29 and lists.lines() == 156_201
    assert len(lists.merged("noun")) == 119_034 and len(lists.merged("adj")) == 21_538
    assert "abacus" in lists.files["noun.artifact"] and "square" in lists.files["noun.shape"]
