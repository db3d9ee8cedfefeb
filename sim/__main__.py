from sim.cli import main
import sys
sys.exit(main())
