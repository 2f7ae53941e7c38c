"""Strings that llama.cpp must tokenize exactly as transformers does: prose, code, numbers, Unicode, whitespace
runs, contractions, and the tokenizer's own special tokens inside text. `corpus(tokenizer)` gives at least 200."""

PROSE = [
    "Hello world", "hello world", "HELLO WORLD", " Hello", "  Hello", "Hello ", "Hello  ", "\nHello", "Hello\n",
    "The quick brown fox jumps over the lazy dog.", "It's a dog's life, isn't it? They're here; we'll see, I'd say.",
    "DON'T SHOUT, YOU'LL WAKE THE BABY", "Mr. O'Neil's e-mail: a.b-c_d@example.co.uk", "well-known, self-evident",
    "What is the capital of France?", "How can I make my writing more concise?", "Give me three tips for sleeping better.",
    "Lorem ipsum dolor sit amet, consectetur adipiscing elit, sed do eiusmod tempor.", "a", "I", " ", "", "A.B.C.",
    "(parenthesised) [bracketed] {braced} <angled>", "\"double\" 'single' `back`", "semi;colon:colon,comma.dot!bang?q",
    "...", "?!?!", "--", "---", "***bold***", "__init__", "#hashtag @mention $dollar %percent ^caret &amp",
    "https://huggingface.co/HuggingFaceTB/SmolLM2-135M-Instruct?x=1&y=2#frag", "C:\\Users\\me\\file.txt", "~/.bashrc",
]
CODE = [
    "def f(x):\n    return x * 2\n", "for (int i = 0; i < n; ++i) {\n\tsum += a[i];\n}", "SELECT name, COUNT(*) FROM users "
    "WHERE age >= 18 GROUP BY name ORDER BY 2 DESC LIMIT 10;", "import numpy as np\nx = np.arange(10).reshape(2, 5)",
    "if __name__ == \"__main__\":\n    main()", "const f = (a, b) => a ?? b;", "x+=1;y-=2;z*=3;w/=4", "a == b != c <= d >= e",
    "{\"key\": [1, 2.5, null, true], \"nested\": {\"k\": \"v\"}}", "<div class=\"x\">text</div>", "fn main() { println!(\"hi\"); }",
    "    indented four", "\tone tab", "\t\ttwo tabs", "line1\nline2\r\nline3\rline4", "#include <stdio.h>",
    "SELECT * FROM t WHERE id IN (1,2,3) AND name LIKE '%ab_c%';", "CREATE TABLE head (age INTEGER, name TEXT)",
    "lambda x: x**2 if x > 0 else -x", "git commit -m \"fix: off-by-one\" && git push origin main", "$ ls -la | grep .py",
    "matrix[i][j] = matrix[j][i]", "print(f'{value:>10.3f}')", "// comment\n/* block */", "<|notatoken|>", "</s>x<s>",
]
NUMBERS = [
    "0", "1", "12", "123", "1234", "12345", "123456789", "3.14159", "-42", "+7", "1e-5", "6.02e23", "1,000,000",
    "1 000 000", "0x1F", "0b1010", "007", "2024-12-02", "13:40:00", "50%", "$19.99", "v1.2.3", "1/2", "3:2", "10^6",
    "100000000000000000000", "3rd 21st 42nd", "pi=3.1415926535897932384626", "phone +44 20 7946 0958", "ISBN 978-3-16",
    "x1y22z333", "a1b2c3d4e5", "1.", ".5", "1..2", "١٢٣", "一二三 123", "Ⅻ", "½ ¾ ²³",
]
UNICODE = [
    "café", "naïve façade", "Zürich Straße", "¿Qué tal? ¡Muy bien!", "Привет, мир!", "Γειά σου Κόσμε", "שלום עולם",
    "مرحبا بالعالم", "नमस्ते दुनिया", "こんにちは世界", "你好，世界！", "안녕하세요 세계", "สวัสดีชาวโลก", "Xin chào thế giới",
    "😀", "👍🏽", "👨‍👩‍👧‍👦", "🇫🇷🇯🇵", "I ❤️ NY", "→ ← ↑ ↓ ⇒", "∀x∈ℝ: x²≥0", "≠ ≤ ≥ ± × ÷ √ ∞", "—–‐", "“quotes” ‘single’",
    "«guillemets»", "…", "\u00a0non-breaking\u00a0space", "zero\u200bwidth", "e\u0301 (combining)", "ﬁ ligature",
    "Ｆｕｌｌｗｉｄｔｈ", "ǅ Ǆ ǆ", "ÅÄÖ åäö", "İstanbul ıi", "ß ẞ", "ℌ𝔢𝔩𝔩𝔬", "\U0001f600\U0001f601", "€£¥₹₿", "©®™",
    "日本語とEnglishの混在text", "Ελληνικά and English", "tab\tafter ünïcödé", "\u3000ideographic space",
]
WHITESPACE = [
    " ", "  ", "   ", "    ", "        ", "\t", "\t\t", "\n", "\n\n", "\n\n\n", "\r\n", " \n ", "\n \n", "a  b", "a   b",
    "a    b", "a\tb", "a\t\tb", "a\nb", "a\n\nb", "a \n b", "a\n\n\n\nb", "trailing   ", "   leading", " \t \t ",
    "word\n    indented", "x \ty", "end.\n", "end.\n\n", "  \n  \n", "a" + " " * 17 + "b", "\n" * 7 + "x",
]


def corpus(tokenizer) -> list[str]:
    """All the strings above, the special tokens alone and inside text, and combinations of them."""
    named = [t for t in tokenizer.all_special_tokens if t]
    others = [t.content for t in tokenizer.added_tokens_decoder.values() if t.content not in named]
    specials = named + others[:5]
    with_specials = []
    for token in specials:
        with_specials += [token, f"{token}Hello", f"Hello{token}", f" {token} ", f"{token}\n{token}", f"x{token}12 y"]
    mixed = [f"{a} {b}" for a, b in zip(PROSE, NUMBERS)] + [a + b for a, b in zip(CODE, UNICODE)] \
        + [a + b for a, b in zip(WHITESPACE, PROSE[::-1])]
    strings = PROSE + CODE + NUMBERS + UNICODE + WHITESPACE + with_specials + mixed
    return list(dict.fromkeys(s for s in strings if s))
