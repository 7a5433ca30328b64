"""`python -m ouro_train.train` = `ouro-train` (for launchers that want a module)."""

from ouro_train.cli import train

if __name__ == "__main__":
    train()
