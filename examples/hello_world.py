"""Hello world: one semantic function, called twice; the system prompt is computed once."""

import parrot_core as P


@P.semantic_function()
def greet(name: P.Input, reply: P.Output(max_tokens=32, temperature=0.0)):
    """<|im_start|>system
    You are a cheerful assistant. Answer in one short sentence.<|im_end|>
    <|im_start|>user
    Say hello to {{name}}.<|im_end|>
    <|im_start|>assistant
    {{reply}}"""


def main() -> None:
    with P.Runtime() as rt:
        alice, bob = greet("Alice"), greet("Bob")  # both return at once; they run when fetched
        print("Alice:", alice.get().strip())
        print("Bob:  ", bob.get().strip())
        stats = rt.stats()
        print(f"prompt tokens computed: {stats['prompt_tokens_computed']}, context forks: {stats['context_forks']}")


if __name__ == "__main__":
    main()
