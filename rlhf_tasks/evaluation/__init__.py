"""Step 4: evaluation of the SFT vs PPO policies, the report with plots, and chat/generate.

- `stage.run(spec)`: the eval stage job (single process); `stage.evaluate(EvalInputs, EvalConfig)` on folders.
- `metrics`: pure metric functions (win rate, EOS rate, KL, pairwise accuracy).
- `report.write_report` (`rlhf report`), `report.publish_report` (Prefect hook, Prefect-free).
- `chat`: loading a policy, `ChatSession`/`chat_loop` (`rlhf chat`), `generate_answers` (`rlhf generate`); the
  handlers of those commands are in rlhf_tasks/cli.py.
"""
