"""``python -m service``: the same as the ``qbo-webhooks`` console script."""

from service.cli import main

if __name__ == "__main__":
    main()
