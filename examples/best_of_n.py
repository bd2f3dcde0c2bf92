"""Best-of-n with forked contexts: one question filled once, n sampled answers in forks of it,
then a judge picks one. Each fork shares the question's KV blocks; nothing is recomputed."""

import threading

import parrot_core as P

QUESTION = "Give one practical tip for writing readable Python code."
N = 3


@P.semantic_function()
def judge(candidates: P.Input, choice: P.Output(max_tokens=4, temperature=0.0)):
    """<|im_start|>system
    You pick the most useful tip. Answer with its number only.<|im_end|>
    <|im_start|>user
    {{candidates}}
    Which tip is the most useful?<|im_end|>
    <|im_start|>assistant
    Tip number {{choice}}"""


def main() -> None:
    with P.Runtime() as rt:
        prompt = rt.apply_chat_template([{"role": "user", "content": QUESTION}])
        answers: list[str] = [""] * N
        with rt.new_context() as root:
            root.fill(prompt)

            def sample(i: int) -> None:
                with root.fork() as branch:
                    answers[i] = branch.generate(max_tokens=40, temperature=0.8, seed=i).text.strip()

            threads = [threading.Thread(target=sample, args=(i,)) for i in range(N)]
            for t in threads:
                t.start()
            for t in threads:
                t.join()
        for i, a in enumerate(answers, 1):
            print(f"{i}. {a}")
        listed = "\n".join(f"{i}. {a}" for i, a in enumerate(answers, 1))
        print("Judge picks tip", judge(listed).get().strip())
        print(f"context forks: {rt.stats()['context_forks']}")


if __name__ == "__main__":
    main()
