import sys

from contiv.ctl import main

sys.exit(main())
