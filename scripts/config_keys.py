"""Print every config key as a Markdown table (pasted into README.md; a test keeps them in sync)."""

from leanlm.engine.config import describe_keys

if __name__ == "__main__":
    print("| key | default | meaning |\n|---|---|---|")
    for key, default, help_ in describe_keys():
        meaning = help_.replace("|", "\\|")
        print(f"| `{key}` | `{default}` | {meaning} |")
