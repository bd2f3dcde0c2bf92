"""Map-reduce summarization: summarize every chunk in parallel, then combine the summaries.

The map calls feed one reduce call, so they form one task group: the scheduler places them
together and the engine batches them. Their shared instructions are computed once.
"""

import sys

sys.path.insert(0, __file__.rsplit("/", 1)[0])

import parrot_core as P
from _texts import chunks

N = 4


@P.semantic_function()
def summarize(text: P.Input, summary: P.Output(max_tokens=32, temperature=0.0)):
    """<|im_start|>system
    You summarize technical documentation in one sentence.<|im_end|>
    <|im_start|>user
    Summarize: {{text}}<|im_end|>
    <|im_start|>assistant
    {{summary}}"""


@P.semantic_function()
def combine(s0: P.Input, s1: P.Input, s2: P.Input, s3: P.Input, overview: P.Output(max_tokens=48, temperature=0.0)):
    """<|im_start|>system
    You combine partial summaries into one overview of two sentences.<|im_end|>
    <|im_start|>user
    Partial summaries:
    1. {{s0}}
    2. {{s1}}
    3. {{s2}}
    4. {{s3}}
    Write the overview.<|im_end|>
    <|im_start|>assistant
    {{overview}}"""


def main() -> None:
    parts = chunks(words_per_chunk=100, limit=N)
    with P.Runtime() as rt:
        partial = [summarize(part) for part in parts]
        overview = combine(*partial)
        print("Overview:", overview.get(P.LATENCY).strip())
        for i, s in enumerate(partial):
            print(f"  part {i + 1}: {s.get().strip()}")
        print(f"prompt tokens computed: {rt.stats()['prompt_tokens_computed']}")


if __name__ == "__main__":
    main()
