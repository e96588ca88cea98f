"""empath.ctl"""
